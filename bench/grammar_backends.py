"""Why xgrammar: grammar libraries compared on the same schema and vocabularies, in one run.

For each library: the one-time vocabulary set-up, the compile time of a typical JSON schema (a
record with bounded strings, a range, an email, an array and a nested object), and the time per
decode step to fill the token masks of a batch of 16 constrained rows and advance them by the
sampled token (walking a valid document). Vocabularies: a real 130k byte-level BPE (Mistral's
Tekken, shipped by the `mistral_common` test dependency and converted here), and the demo model's.

llguidance and outlines-core are not dependencies; rows for a library that is not installed are
skipped (`pip install llguidance outlines-core` to reproduce the whole table). Not a test.

    .venv/bin/python bench/grammar_backends.py
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
}
DOCUMENT = {
    "name": "Ann Lee",
    "age": 31,
    "email": "ann@example.com",
    "tags": ["a", "bb"],
    "address": {"city": "Paris", "zip": "75001"},
    "role": "user",
}


def tekken_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Mistral's 130k Tekken vocabulary as a Hugging Face byte-level BPE tokenizer."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("mistral_common")  # the data file only; the package is not imported
    data = json.loads((Path(next(iter(spec.submodule_search_locations))) / "data" / "tekken_240911.json").read_text())
    n_special = data["config"]["default_num_special_tokens"]
    ranks = data["vocab"][: data["config"]["default_vocab_size"] - n_special]
    bpe = out_dir / "tekken.tiktoken"
    bpe.write_text("".join(f"{r['token_bytes']} {r['rank']}\n" for r in ranks))
    specials = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, n_special)]
    converter = TikTokenConverter(
        vocab_file=str(bpe), pattern=data["config"]["pattern"], additional_special_tokens=specials
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def timed(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_xgrammar(tok, doc_ids: list[int]) -> tuple[float, float, float]:
    import xgrammar as xgr

    from lorax_server.grammar import FILL_THREADS, GrammarCompiler, GrammarKind, GrammarSpec

    compiler = GrammarCompiler(tok, len(tok), {tok.eos_token_id})
    _, setup = timed(compiler._xgr_compiler)
    spec = GrammarSpec(GrammarKind.JSON, json.dumps(SCHEMA))
    compiled, compile_s = timed(lambda: compiler.compile(spec))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    filler = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS)
    bitmask = xgr.allocate_token_bitmask(BATCH, len(tok))
    start = time.perf_counter()
    for t in doc_ids:
        filler.batch_fill_next_token_bitmask(matchers, bitmask)
        xgr.BatchGrammarMatcher.batch_accept_token(matchers, [t] * BATCH)
    return setup, compile_s, (time.perf_counter() - start) / len(doc_ids)


def bench_llguidance(tok, doc_ids: list[int]) -> tuple[float, float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok, setup = timed(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=len(tok)))
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile_schema():  # noqa: ANN202
        return llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options))

    first, compile_s = timed(compile_schema)
    matchers = [(first.deep_copy(), i) for i in range(BATCH)]
    executor = llguidance.LLExecutor(num_threads=1)
    bitmask = llguidance.torch.allocate_token_bitmask(BATCH, len(tok))
    start = time.perf_counter()
    for t in doc_ids:
        llguidance.torch.fill_next_token_bitmask_par(executor, matchers, bitmask)
        for m, _ in matchers:
            m.consume_token(t)
    return setup, compile_s, (time.perf_counter() - start) / len(doc_ids)


def bench_outlines(tok, doc_ids: list[int]) -> tuple[float, float, float]:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    def vocabulary():  # noqa: ANN202 - byte-level tokens back to their bytes, as outlines-core wants them
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i != tok.eos_token_id and i not in tok.all_special_ids:
                tokens.setdefault(bytes(byte_of[c] for c in text), []).append(i)
        return outlines_core.Vocabulary(tok.eos_token_id, tokens)

    vocab, setup = timed(vocabulary)
    index, compile_s = timed(lambda: outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab))
    guides = [outlines_core.Guide(index) for _ in range(BATCH)]
    bitmask = torch.zeros(BATCH, (len(tok) + 31) // 32, dtype=torch.int32)
    start = time.perf_counter()
    for t in doc_ids:
        for row, guide in enumerate(guides):
            guide.write_mask_into(bitmask[row].data_ptr(), bitmask[row].numel(), 4)
        for guide in guides:
            guide.advance(t)
    return setup, compile_s, (time.perf_counter() - start) / len(doc_ids)


LIBRARIES = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance, "outlines-core": bench_outlines}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vocabularies = {
            "tekken 130k": tekken_tokenizer(Path(tmp)),
            "demo 1k": AutoTokenizer.from_pretrained(ROOT / "models" / "demo"),
        }
        text = json.dumps(DOCUMENT)
        print(f"schema: {len(json.dumps(SCHEMA))} bytes; mask fill + advance for {BATCH} rows per step\n")
        print(f"| vocabulary | library | vocabulary set-up s | schema compile ms | per step ms ({BATCH} rows) |")
        print("|---|---|---:|---:|---:|")
        for name, tok in vocabularies.items():
            doc_ids = tok(text, add_special_tokens=False)["input_ids"]
            for library, bench in LIBRARIES.items():
                module = {"outlines-core": "outlines_core"}.get(library, library)
                if importlib.util.find_spec(module) is None:
                    print(f"| {name} | {library} | not installed | | |")
                    continue
                setup, compile_s, step = bench(tok, doc_ids)
                print(f"| {name} | {library} | {setup:.2f} | {compile_s * 1e3:.1f} | {step * 1e3:.3f} |")


if __name__ == "__main__":
    main()
