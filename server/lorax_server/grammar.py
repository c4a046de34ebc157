"""Constrained decoding: grammars compiled against our tokenizer, and their per-step token masks.

A request may carry a grammar (proto `Grammar`): a JSON schema, a regular expression, or "JSON or
text" (tool_choice auto). Grammars compile with xgrammar (chosen by measurement over outlines-core
and llguidance: bench/grammar_backends.py). Compiled grammars are cached by (type, value) under a
byte budget, and compiled off the engine thread (the CompileGrammar RPC, which the router calls
before queueing a request): xgrammar releases the GIL while it compiles, so decode steps go on.

Each step, the constrained rows' masks are filled into one int32 bitmask (bit t of row r: token t
is allowed) by xgrammar's batched matcher, then applied to the scores in one tensor op. End-of-
sequence tokens are allowed only where the grammar can end.
"""

from __future__ import annotations

import enum
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import NamedTuple

import torch
import xgrammar as xgr

# JSON the grammar emits: no free whitespace (a model cannot stall in it, and the output length is
# bounded by the schema's own bounds), readable separators.
JSON_SEPARATORS = (", ", ": ")
# Text in "JSON or text" mode: empty, or text whose first non-whitespace character is not `{`.
_TEXT_REGEX = r"(\s*[^{\s][\s\S]*)?"
# Threads that fill a step's masks: on a small host the thread hand-off costs more than it saves
# (measured: 16 rows of the demo vocabulary, 0.10 ms on one thread, 0.16 ms on two of two cores).
FILL_THREADS = max(1, min(8, (os.cpu_count() or 1) // 4))
# One unescaped string character: xgrammar's class for length-bounded strings, and JSON's.
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


class GrammarKind(enum.IntEnum):
    """What a grammar's value holds; the values equal proto GrammarType."""

    NONE = 0
    JSON = 1
    REGEX = 2
    JSON_OR_TEXT = 3


class GrammarSpec(NamedTuple):
    kind: GrammarKind
    value: str


class GrammarError(ValueError):
    """The grammar cannot be compiled (the caller's fault)."""


class GrammarCompiler:
    """Compiles grammars for one tokenizer; thread-safe. Each grammar compiles once: concurrent
    requests for it wait for the same compilation, later ones hit the cache."""

    def __init__(
        self,
        tokenizer,  # noqa: ANN001 - a transformers tokenizer
        vocab_size: int,
        eos_token_ids: set[int],
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache_bytes = cache_bytes
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._cached_bytes = 0
        self._pending: dict[GrammarSpec, Future] = {}
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        # The vocabulary's decoded bytes are worked out once, on first use (about a second for a
        # 130k vocabulary), so servers that never constrain pay nothing.
        with self._setup_lock:
            if self._compiler is None:
                info = tokenizer_info(self._tokenizer, self._vocab_size, self._eos)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def is_cached(self, spec: GrammarSpec) -> bool:
        with self._lock:
            return spec in self._cache

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`; raises GrammarError when it cannot be compiled."""
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
            pending = self._pending.get(spec)
            owner = pending is None
            if owner:
                pending = self._pending[spec] = Future()
        if not owner:
            return pending.result()
        try:
            compiled = self._compile(spec)
        except BaseException as e:
            with self._lock:
                del self._pending[spec]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._pending[spec]
            self._store(spec, compiled)
        pending.set_result(compiled)
        return compiled

    def _store(self, spec: GrammarSpec, compiled: xgr.CompiledGrammar) -> None:
        size = compiled.memory_size_bytes
        self._cache[spec] = compiled
        self._cached_bytes += size
        while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.memory_size_bytes

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        compiler = self._xgr_compiler()
        try:
            if spec.kind == GrammarKind.JSON:
                return compiler.compile_grammar(_json_grammar(spec.value))
            if spec.kind == GrammarKind.REGEX:
                if not spec.value:
                    raise GrammarError("the regex is empty")
                return compiler.compile_regex(spec.value)
            if spec.kind == GrammarKind.JSON_OR_TEXT:
                text = xgr.Grammar.from_regex(_TEXT_REGEX)
                return compiler.compile_grammar(xgr.Grammar.union(_json_grammar(spec.value), text))
        except GrammarError:
            raise
        except Exception as e:  # xgrammar reports invalid schemas and regexes as RuntimeError etc.
            raise GrammarError(f"the {spec.kind.name.lower()} grammar cannot be compiled: {_reason(e)}") from e
        raise GrammarError(f"unknown grammar type {int(spec.kind)}")

    def matcher(self, spec: GrammarSpec) -> xgr.GrammarMatcher:
        """A fresh matcher (one request's parse state) of `spec`."""
        return xgr.GrammarMatcher(self.compile(spec))


def tokenizer_info(tokenizer, vocab_size: int, eos_token_ids: list[int]) -> xgr.TokenizerInfo:  # noqa: ANN001
    """xgrammar's view of our vocabulary: each token's text (xgrammar decodes byte-level and
    SentencePiece pieces itself), with special tokens blanked so no grammar ever allows them as
    text (the detokenizer drops them from the output); only the EOS tokens stay allowed, where the
    grammar can end. Ids past the tokenizer (a head larger than the vocabulary) are never allowed."""
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_token_ids)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    vocab = [""] * vocab_size
    for text, i in tokenizer.get_vocab().items():
        if i < vocab_size and i not in special:
            vocab[i] = text
    return xgr.TokenizerInfo(
        vocab,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=eos_token_ids,
        add_prefix_space=detected.add_prefix_space,
    )


def _json_grammar(schema: str) -> xgr.Grammar:
    try:
        json.loads(schema)
    except ValueError as e:
        raise GrammarError(f"the JSON schema is not valid JSON: {e}") from e
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS)
    # xgrammar's strings with a length bound let raw control characters through, which JSON forbids
    # (json.loads refuses them): give those strings the character class of its unbounded strings.
    ebnf = str(grammar)
    fixed = ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)
    return grammar if fixed == ebnf else xgr.Grammar.from_ebnf(fixed)


def _reason(e: Exception) -> str:
    """xgrammar's message without its `[time] file.cc:line:` prefix."""
    text = str(e).strip()
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("[") else text


class TokenMasks:
    """The allowed tokens of a batch's constrained rows for one step: an int32 bitmask with a row
    per batch row (bit t % 32 of word t // 32: token t allowed); unconstrained rows are all ones."""

    _filler: xgr.BatchGrammarMatcher | None = None

    def __init__(self, rows: list[int], bitmask: torch.Tensor) -> None:
        self.rows = rows  # the constrained rows
        self.bitmask = bitmask  # [batch, ceil(vocab / 32)] int32, on the logits' device

    @classmethod
    def fill(
        cls, matchers: list[xgr.GrammarMatcher], rows: list[int], batch: int, vocab: int, device: torch.device
    ) -> TokenMasks:
        """Every matcher's next-token mask (matchers[i] is row rows[i]) in one batched call, which
        runs in xgrammar with the GIL released."""
        if cls._filler is None:
            cls._filler = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS)
        bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
        cls._filler.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        return cls(rows, bitmask.to(device, non_blocking=True))

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set every disallowed token of the constrained rows to -inf, in place, in one kernel
        (xgrammar's, on CPU and CUDA; `unpack_bitmask` is its torch reference in the tests)."""
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=logits.shape[-1], indices=self.rows)
        return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, words] int32 bitmask → [n, vocab] bool (bit t % 32 of word t // 32 is token t)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts).bitwise_and_(1)  # [n, words, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


def advance(matchers: list[xgr.GrammarMatcher], tokens: list[int]) -> None:
    """Feed each matcher its row's chosen token, in one call. (A matcher that took EOS has ended;
    its request finishes in the same step, so it is never filled or advanced again.)"""
    xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
