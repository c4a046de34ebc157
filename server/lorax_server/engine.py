"""The batching engine: prefill new requests, decode cached batches one token at a time (merging
batches as they join), filter finished or cancelled requests, and size the KV cache at warm-up.

Proto-free: `server.py` converts messages to and from the dataclasses used here.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import psutil
import torch

from . import decode_graphs
from .adapters import lora_cpu
from .adapters.chat_template import ChatTemplateFiles
from .adapters.lora import segments_of
from .adapters.manager import AdapterInUse, AdapterManager, AdapterRequest, Modules
from .batch import Batch, Pending, RequestIn, cat_padded
from .forward import ForwardBatch
from .grammar import GrammarCompiler, GrammarError, GrammarSpec, advance
from .kv_cache import BlockManager, KVCache, OutOfBlocks
from .layers import packed
from .models.transformer import CausalLM
from .outputs import Emitter, GenerationOut, StepTimings, TokenList
from .prompts import add_prompt_logprobs, allocate, start_rows
from .prompts import pieces as prompt_pieces
from .sampling import BatchSampler
from .speculation import SpeculationConfig, Speculator
from .utils.memory import gpu_cache_budget, return_freed_memory

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """The request can never be served as sent (the caller's fault)."""


class BatchNotFound(KeyError):
    pass


class NotWarmedUp(RuntimeError):
    pass


class HealthCheckFailed(RuntimeError):
    """The health check's forward pass raised or gave non-finite logits: the shard cannot generate."""


@dataclass
class CacheConfig:
    block_size: int = 16
    memory_fraction: float | None = None  # of free device memory (CUDA) or available RAM (CPU)
    num_blocks: int | None = None  # explicit size; overrides memory_fraction
    prefix_caching: bool = False  # reuse the KV blocks of prompt prefixes seen before (same adapter)
    wiggle_room: float = 1.0  # share of the GPU memory left for the cache that it takes (--memory-wiggle-room)


class Engine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer,  # noqa: ANN001 - a transformers tokenizer
        cache_config: CacheConfig,
        adapters: AdapterManager | None = None,
        chunked_prefill: bool = False,
        speculation: SpeculationConfig | None = None,
        cuda_graphs: bool = False,
        cuda_graph_max_batch: int = decode_graphs.BUCKETS[-1],
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.cache_config = cache_config
        self.device = model.device
        self.eos_ids = set(model.config.eos_token_ids)
        self.special_ids = set(tokenizer.all_special_ids)
        self.emitter = Emitter(tokenizer, self.special_ids)
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size, self.eos_ids)
        self.batches: dict[int, Batch] = {}
        self.cache: KVCache | None = None
        self.blocks: BlockManager | None = None
        self.timings = StepTimings()
        self.prefix_caching = cache_config.prefix_caching
        if self.prefix_caching and model.recompute_at_length is not None:
            # Such a model rewrites a sequence's whole cache at that length: shared blocks would change
            # under the other sequences reading them.
            log.warning(
                "prefix caching is off: this model recomputes every cached key at length %d",
                model.recompute_at_length,
            )
            self.prefix_caching = False
        self.cached_prompt_tokens = 0  # prompt tokens prefix caching spared, since start
        self.chunked_prefill = chunked_prefill
        # Under chunked prefill, the most prompt tokens one step computes (the router's prefill budget,
        # known at warm-up); None: every prompt is computed whole in its prefill step.
        self.chunk_tokens: int | None = None
        # Drafts come from prompt lookup (`speculation`) and from the Medusa heads adapters may carry.
        speculation = speculation or SpeculationConfig()
        on = speculation.enabled or adapters is not None
        self.speculator = Speculator(speculation, model, self.emitter, adapters) if on else None
        self.cuda_graphs = cuda_graphs and decode_graphs.available(model)  # `--compile`
        self.cuda_graph_max_batch = cuda_graph_max_batch  # `--compile-max-batch-size`: larger batches run eagerly
        self.graphs: decode_graphs.DecodeGraphs | None = None  # made at warm-up, over the KV cache

    # ------------------------------------------------------------------ warm-up and cache sizing
    def warmup(self, max_input_length: int, max_prefill_tokens: int, max_total_tokens: int) -> int:
        """Run the largest prefill the router may send, then size the KV cache from what memory is
        left. Returns the number of tokens the cache holds (the router's max_batch_total_tokens)."""
        if max_input_length < 1 or max_prefill_tokens < 1:
            raise RequestError("max_input_length and max_prefill_tokens must be positive")
        limit = self.model.position_limit
        if limit is not None and max_total_tokens > limit:
            raise RequestError(
                f"max_total_tokens={max_total_tokens} exceeds the {limit} positions this model can handle; "
                f"lower --max-total-tokens to {limit} or less (and --max-input-length below it)"
            )
        self.clear()
        self.cache = self.blocks = None
        self.chunk_tokens = max_prefill_tokens if self.chunked_prefill else None
        self._dummy_prefill(min(max_input_length, max_prefill_tokens) if self.chunked_prefill else max_input_length,
                            max_prefill_tokens)  # fmt: skip
        if self.device.type == "cpu":
            if hasattr(self.model, "linears"):  # not the transformers fallback, whose weights are not packed
                packed.make_primitives(self.model.linears())  # small batches' oneDNN primitives, now
            return_freed_memory()  # the dummy prefill's activations: free memory is measured next
            if self.adapters is not None:
                # The LoRA kernel loads on its first use otherwise: the first adapter request would wait
                # for it (about 7 ms), and a failed build would be reported then rather than now.
                lora_cpu.EXTENSION.ops()
        bs = self.cache_config.block_size
        layers, kv_heads, head_dim, dtype = self.model.cache_geometry
        per_block = KVCache.bytes_per_block(layers, bs, kv_heads, head_dim, dtype)
        num_blocks = self.cache_config.num_blocks or self._blocks_from_memory(per_block)
        # Ranks hand out blocks in lockstep: every rank's cache has the smallest rank's size.
        tp = getattr(self.model, "tp", None)
        if tp is not None:
            num_blocks = tp.all_reduce_min(num_blocks)
        scratch = 1 if self.cuda_graphs else 0  # the decode graphs' padding rows write to a block of their own
        if (num_blocks - scratch) * bs < max_total_tokens:
            raise RequestError(
                f"the KV cache holds {(num_blocks - scratch) * bs} tokens, fewer than "
                f"max_total_tokens={max_total_tokens}; lower --max-total-tokens or give the cache more memory"
            )
        self.cache = KVCache(layers, num_blocks, bs, kv_heads, head_dim, dtype, self.device)
        num_blocks -= scratch
        self.blocks = BlockManager(num_blocks, bs)
        if self.cuda_graphs:
            widest, largest = -(-max_total_tokens // bs), self.cuda_graph_max_batch
            self.graphs = decode_graphs.DecodeGraphs(self.model, self.cache, num_blocks, widest, largest)
        log.info(
            "KV cache: %s, %d blocks of %d tokens = %d tokens (%.1f MiB)",
            str(dtype).removeprefix("torch."),  # float8_e4m3fn under --quantize fp8-kv: 1 byte per value
            num_blocks,
            bs,
            num_blocks * bs,
            num_blocks * per_block / 2**20,
        )
        return num_blocks * bs

    def _blocks_from_memory(self, per_block: int) -> int:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            unused = 0
            if self.adapters is not None:  # adapters get their share of the GPU first; the KV cache the rest
                unused = self.adapters.device_budget_bytes - self.adapters.device_bytes
            fraction = self.cache_config.memory_fraction or 1.0
            budget = self.cache_config.wiggle_room * gpu_cache_budget(free, total, fraction, self._prefill_peak, unused)
        else:
            budget = psutil.virtual_memory().available * (self.cache_config.memory_fraction or 0.05)
        return max(1, int(budget // per_block))

    def _dummy_prefill(self, max_input_length: int, max_prefill_tokens: int) -> None:
        lens = [max_input_length] * (max_prefill_tokens // max_input_length)
        if max_prefill_tokens % max_input_length:
            lens.append(max_prefill_tokens % max_input_length)
        # What the largest prefill takes beyond the weights (its activations and its few KV blocks):
        # kept free when the KV cache is sized; with decode graphs, also their private memory pool,
        # which holds what the largest captured decode step allocates.
        self._prefill_peak = self._peak_of(lens)
        if self.cuda_graphs and self.device.type == "cuda":
            largest = max((b for b in decode_graphs.BUCKETS if b <= self.cuda_graph_max_batch), default=1)
            self._prefill_peak += self._peak_of([1] * largest)

    def _peak_of(self, lens: list[int]) -> int:
        """Run one forward pass over prompts of `lens` tokens; on a GPU, the bytes it allocated at its peak."""
        bs = self.cache_config.block_size
        tables = [sum(math.ceil(n / bs) for n in lens[:i]) for i in range(len(lens))]
        width = max(math.ceil(n / bs) for n in lens)
        block_tables = torch.tensor(
            [[start + j for j in range(width)] for start in tables], dtype=torch.int64, device=self.device
        )
        total_blocks = sum(math.ceil(n / bs) for n in lens) + width
        layers, kv_heads, head_dim, dtype = self.model.cache_geometry
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        cache = KVCache(layers, total_blocks, bs, kv_heads, head_dim, dtype, self.device)
        ids = torch.zeros(sum(lens), dtype=torch.int64, device=self.device)
        self.model.forward(ForwardBatch.build(ids, lens, lens, block_tables, bs), cache)
        del cache
        return torch.cuda.max_memory_allocated(self.device) - before if on_gpu else 0

    # ------------------------------------------------------------------ health
    def health(self) -> None:
        """Run one token through the model's real forward path; raises `HealthCheckFailed`.

        Cached batches are not touched: after warm-up the token goes to a free KV block, whose one
        written slot is restored and which is freed again; before warm-up, or when every block is in
        use, to a one-block scratch cache. No adapter applies. Called on the engine thread, between
        steps, like every other engine call.
        """
        layers, kv_heads, head_dim, dtype = self.model.cache_geometry
        bs = self.cache_config.block_size
        blocks = self.blocks if self.cache is not None and self.blocks is not None and self.blocks.num_free else None
        if blocks is not None and self.cache is not None:
            cache, table = self.cache, blocks.allocate(1)
        else:
            cache, table = KVCache(layers, 1, bs, kv_heads, head_dim, dtype, self.device), [0]
        # The token is written to slot 0 of the block; keep what was there (a freed block may still
        # hold another sequence's keys) and put it back, so the shared cache ends bit-identical.
        tensors = [*cache.keys, *cache.values]  # each [num_blocks, block_size, kv_heads, head_dim]
        saved = [t[table[0], 0].clone() for t in tensors]
        try:
            ids = torch.zeros(1, dtype=torch.int64, device=self.device)
            block_table = torch.tensor([table], dtype=torch.int64, device=self.device)
            logits = self.model.forward(ForwardBatch.build(ids, [1], [1], block_table, bs), cache)
            finite = bool(torch.isfinite(logits).all())
        except Exception as e:
            log.exception("health check failed")
            raise HealthCheckFailed(f"the health check's forward pass failed: {type(e).__name__}: {e}") from e
        finally:
            for t, old in zip(tensors, saved, strict=True):
                t[table[0], 0] = old
            if blocks is not None:
                blocks.free(table)
        if not finite:
            log.error("health check: the forward pass gave non-finite logits")
            raise HealthCheckFailed("the health check's forward pass gave non-finite logits")

    # ------------------------------------------------------------------ grammars
    def compile_grammar(self, spec: GrammarSpec) -> None:
        """(Grammar thread.) Compile `spec` into the cache, so prefill finds it ready."""
        self.grammars.compile(spec)

    def _matcher(self, r: RequestIn):  # noqa: ANN202 - an xgrammar matcher or None
        if r.grammar is None:
            return None
        if not self.grammars.is_cached(r.grammar):  # the router compiles first; direct gRPC callers may not
            log.warning("request %d: compiling its grammar inside prefill (call CompileGrammar first)", r.id)
        try:
            return self.grammars.matcher(r.grammar)
        except GrammarError as e:
            raise RequestError(f"request {r.id}: {e}") from e

    # ------------------------------------------------------------------ batch lifecycle
    def _require_cache(self) -> tuple[KVCache, BlockManager]:
        if self.cache is None or self.blocks is None:
            raise NotWarmedUp("the shard has not been warmed up: call Warmup first")
        return self.cache, self.blocks

    def _validate(self, requests: list[RequestIn]) -> None:
        _, blocks = self._require_cache()
        if not requests:
            raise RequestError("batch has no requests")
        vocab = self.model.config.vocab_size
        for r in requests:
            if not r.input_ids:
                raise RequestError(f"request {r.id}: empty input")
            if r.max_new_tokens < 1:
                raise RequestError(f"request {r.id}: max_new_tokens must be at least 1")
            if max(r.input_ids) >= vocab:
                raise RequestError(f"request {r.id}: token id {max(r.input_ids)} is outside the vocabulary ({vocab})")
            total = len(r.input_ids) + r.max_new_tokens
            if blocks.blocks_for(total) > blocks.num_blocks:
                raise RequestError(
                    f"request {r.id}: {len(r.input_ids)} input + {r.max_new_tokens} new tokens exceed "
                    f"the KV cache ({blocks.num_blocks * blocks.block_size} tokens)"
                )
            if r.adapter_index != 0 and (self.adapters is None or not self.adapters.is_installed(r.adapter_index)):
                what = "is not loaded" if self.adapters is not None else "given, but this model takes no adapters"
                raise RequestError(f"request {r.id}: adapter index {r.adapter_index} {what}")
            if r.top_n_tokens < 0 or r.top_n_tokens > vocab:
                raise RequestError(f"request {r.id}: top_n_tokens must be between 0 and {vocab}")
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise RequestError("request ids in a batch must be unique")
        needed = sum(blocks.blocks_for(len(r.input_ids) + r.max_new_tokens) for r in requests)
        if needed > blocks.num_free:
            raise OutOfBlocks(f"batch needs {needed} KV cache blocks, {blocks.num_free} free")

    def prefill(self, batch_id: int, requests: list[RequestIn]) -> tuple[list[GenerationOut], Batch | None]:
        """Start a batch: every prompt is computed (under chunked prefill, as much of them as the chunk
        budget allows) and every request whose prompt is whole samples its first token."""
        if batch_id in self.batches:
            raise RequestError(f"batch {batch_id} already exists")
        self._validate(requests)
        requests = sorted(requests, key=lambda r: r.adapter_index)  # one contiguous segment per adapter
        try:
            BatchSampler.from_params([r.sampling for r in requests], self.device)  # refuse bad parameters now
        except ValueError as e:
            raise RequestError(str(e)) from e
        matchers = [self._matcher(r) for r in requests]
        _, blocks = self._require_cache()
        batch = Batch.empty(batch_id, self.device)
        registered: list[int] = []
        try:
            identity = self._prefix_identity if self.prefix_caching else None
            self.cached_prompt_tokens += allocate(
                batch, requests, matchers, blocks, identity, self.chunk_tokens, registered
            )
            self.timings = StepTimings()
            gens, batch = self._step(batch, decode=False)
        except BaseException:
            blocks.unregister(registered)  # their keys and values may never have been written
            batch.free(blocks)
            raise
        return gens, self._keep_unfinished(batch, gens)

    def _prefix_identity(self, r: RequestIn) -> object:
        """What a request's prefix keys are salted with: the weights it runs with (its adapter, not the
        index, which may later hold another adapter), and its prompt's length when the model's keys
        depend on it (see `CausalLM.length_dependent_above`)."""
        adapter = (
            "base" if r.adapter_index == 0 or self.adapters is None else self.adapters.installed_key(r.adapter_index)
        )
        above = self.model.length_dependent_above
        return (adapter, len(r.input_ids)) if above is not None and len(r.input_ids) > above else adapter

    def _step(self, batch: Batch, decode: bool) -> tuple[list[GenerationOut], Batch]:
        """One forward pass over the next token of every row (`decode`) and the next piece of every
        pending prompt. Rows sample their next token; prompts that are now whole become rows and sample
        their first. Returns the generations and the batch (with its new rows)."""
        cache, blocks = self._require_cache()
        bs = blocks.block_size
        rows = len(batch) if decode else 0
        lengths = [s.length for s in batch.seqs] if rows else []
        pieces = prompt_pieces(batch.pending, self.chunk_tokens)
        if rows and not pieces and self.speculator is not None:
            gens = self.speculator.step(batch, lengths, cache, blocks.block_size, self.timings)
            if gens is not None:
                return gens, batch
        row_ids, row_query = self._decode_inputs(batch, lengths) if rows else (None, [])
        if pieces:
            meta, spans = self._with_pieces(batch, rows, lengths, row_ids, row_query, pieces, bs)
        else:  # a plain decode step: the rows' tensors as they are, nothing built per row
            segments = segments_of([s.request.adapter_index for s in batch.seqs], row_query)
            meta = ForwardBatch.build(row_ids, row_query, lengths, batch.block_tables, bs, lora_segments=segments)
            spans = []
        # The prompt blocks this pass fills become reusable (see `prompts.allocate`; a prefill's already are).
        registered = [b for p, _, e in pieces for b in blocks.register(p.block_table, p.keys[: e // bs])]
        forward_start = time.perf_counter_ns()
        forward = self.graphs.forward if self.graphs is not None and not pieces else self.model.forward
        try:
            logits = forward(meta, cache)
        except BaseException:
            blocks.unregister(registered)  # never written
            raise
        gens = self._sample_and_advance(batch, logits[:rows], None, forward_start) if rows else []
        whole: list[tuple[Pending, torch.Tensor]] = []
        for (p, s, e), (at, count) in zip(pieces, spans, strict=True):
            p.done = e
            if p.request.prefill_logprobs:
                add_prompt_logprobs(p, logits[at : at + count], s, e)
            if not p.remaining:
                whole.append((p, logits[at + count - 1]))
        if whole:
            batch.pending = [p for p in batch.pending if p.remaining]
            first, started = self._start_rows(batch.id, whole, forward_start)
            gens += first
            batch = Batch.concatenate([batch, started])
        return gens, batch

    def _with_pieces(self, batch, rows, lengths, row_ids, row_query, pieces, bs):  # noqa: ANN001, ANN202
        """The forward pass over the rows' next tokens and the prompt pieces, and where each piece's
        logits are: (start, count) in the logits. A piece gets its last token's logits when it ends its
        prompt, and every token's when its prompt logprobs were asked for."""
        dev = self.device
        prompt_ids = [t for p, s, e in pieces for t in p.request.input_ids[s:e]]
        ids = torch.tensor(prompt_ids, dtype=torch.int64, device=dev)
        if row_ids is not None:
            ids = torch.cat([row_ids, ids])
        query_lens = row_query + [e - s for _, s, e in pieces]
        logit_rows = list(itertools.accumulate(row_query, initial=-1))[1:]  # each row's last token
        spans, offset = [], sum(row_query)
        for p, s, e in pieces:
            if p.request.prefill_logprobs:
                wanted = list(range(offset, offset + e - s))
            else:
                wanted = [offset + e - s - 1] if e == len(p.request.input_ids) else []
            spans.append((len(logit_rows), len(wanted)))
            logit_rows += wanted
            offset += e - s
        tables = [batch.block_tables[:rows]] if rows else []
        tables.append(_pad_tables([p.block_table for p, _, _ in pieces], dev))
        adapters = [s.request.adapter_index for s in batch.seqs[:rows]]
        adapters += [p.request.adapter_index for p, _, _ in pieces]
        meta = ForwardBatch.build(
            ids,
            query_lens,
            lengths + [e for _, _, e in pieces],
            cat_padded(tables, pad=0),
            bs,
            torch.tensor(logit_rows, dtype=torch.int64, device=dev),
            segments_of(adapters, query_lens),
            rope_lens=lengths + [len(p.request.input_ids) for p, _, _ in pieces],
        )
        return meta, spans

    def _start_rows(
        self, batch_id: int, whole: list[tuple[Pending, torch.Tensor]], forward_start: int
    ) -> tuple[list[GenerationOut], Batch]:
        """Requests whose prompt is now in the KV cache as rows of a new batch, each with its first token
        sampled from its last prompt token's logits."""
        pending = [p for p, _ in whole]
        started = start_rows(batch_id, pending, self.eos_ids, self.tokenizer, self.special_ids, self.device)
        prefill = None
        if any(p.request.prefill_logprobs for p in pending):
            prefill = [self.emitter.token_list(p.request.input_ids, p.prompt_logprobs) if p.request.prefill_logprobs
                       else None for p in pending]  # fmt: skip
        logits = torch.stack([row for _, row in whole])
        return self._sample_and_advance(started, logits, prefill, forward_start), started

    def decode(self, batch_ids: list[int]) -> tuple[list[GenerationOut], Batch | None]:
        if not batch_ids:
            raise RequestError("decode needs at least one batch")
        missing = [b for b in batch_ids if b not in self.batches]
        if missing:
            raise BatchNotFound(f"unknown batch id(s) {missing}")
        if len(set(batch_ids)) != len(batch_ids):
            raise RequestError("decode got the same batch twice")
        self._require_cache()
        start = time.perf_counter_ns()
        batch = Batch.concatenate([self.batches.pop(b) for b in batch_ids])
        self.timings = StepTimings(concat_ns=time.perf_counter_ns() - start)
        self.batches[batch.id] = batch
        gens, batch = self._step(batch, decode=True)
        self.batches[batch.id] = batch
        return gens, self._keep_unfinished(batch, gens)

    def _decode_inputs(self, batch: Batch, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """One new token per sequence, except for sequences reaching the model's recompute length:
        those re-run every token (their whole history) so their cached keys are rewritten."""
        ones = [1] * len(batch)
        at = self.model.recompute_at_length
        if at is None or at not in lengths:
            return batch.next_ids, ones
        query_lens = [n if n == at else 1 for n in lengths]
        pieces = [
            batch.history[row, :n] if n == at else batch.next_ids[row : row + 1] for row, n in enumerate(query_lens)
        ]
        return torch.cat(pieces), query_lens

    def _sample_and_advance(
        self, batch: Batch, logits: torch.Tensor, prefill: list[TokenList | None] | None, forward_start: int
    ) -> list[GenerationOut]:
        """Choose every row's next token in one batched pass, then do the per-request host work."""
        masks = batch.token_masks(self.model.config.vocab_size)
        if masks is not None:  # before every processor: penalties and warpers keep -inf at -inf
            masks.apply_(logits)  # in place: these logits feed nothing but this step's sampling
        out = batch.sampler(logits, batch.history, batch.steps, batch.prompt_lens)
        rows = torch.arange(len(batch), device=self.device)
        lengths = torch.tensor([s.length for s in batch.seqs], dtype=torch.int64, device=self.device)
        batch.history[rows, lengths] = out.next_ids
        batch.next_ids = out.next_ids
        batch.steps = batch.steps + 1
        top_n = max(s.request.top_n_tokens for s in batch.seqs)
        chosen = torch.stack([out.next_ids.to(torch.float64), out.chosen_logprobs().double()])
        ids_host, lps_host = chosen.tolist()  # the step's one device → host sync
        top_ids = top_lps = None
        if top_n:
            t_ids, t_lps = out.top_n(top_n)
            top_ids, top_lps = t_ids.tolist(), t_lps.tolist()
        host_start = time.perf_counter_ns()
        # The forward pass is asynchronous on GPU: it is done once the sync above returns.
        self.timings.forward_ns = host_start - forward_start
        if batch.matchers:
            advance(batch.matchers, [int(ids_host[r]) for r in batch.grammar_rows])
        gens = []
        for row, seq in enumerate(batch.seqs):
            top = (top_ids[row], top_lps[row]) if top_ids is not None else None
            gen = self.emitter.emit(seq, int(ids_host[row]), lps_host[row], top)
            if prefill is not None:
                gen.prefill = prefill[row]
            gens.append(gen)
        self.timings.decode_ns = time.perf_counter_ns() - host_start
        return gens

    def _keep_unfinished(self, batch: Batch, gens: list[GenerationOut]) -> Batch | None:
        """Finished requests leave the batch at once, freeing their blocks."""
        _, blocks = self._require_cache()
        finished = {g.request_id for g in gens if g.finished is not None}
        if finished:
            batch.filter([row for row, s in enumerate(batch.seqs) if s.request.id not in finished], blocks)
        if not len(batch) and not batch.pending:
            self.batches.pop(batch.id, None)
            return None
        self.batches[batch.id] = batch
        return batch

    def filter(self, batch_id: int, request_ids: list[int]) -> Batch | None:
        """Keep only `request_ids` (ids no longer in the batch are ignored: they already finished)."""
        if batch_id not in self.batches:
            raise BatchNotFound(f"unknown batch id {batch_id}")
        _, blocks = self._require_cache()
        batch = self.batches[batch_id]
        wanted = set(request_ids)
        batch.filter([row for row, s in enumerate(batch.seqs) if s.request.id in wanted], blocks, wanted)
        if not len(batch) and not batch.pending:
            del self.batches[batch_id]
            return None
        return batch

    # ------------------------------------------------------------------ adapters
    # The rules for swapping adapters in and out live here, beside the batches they protect: an index
    # that running requests use is never emptied or given another adapter under them.
    def adapter_in_use(self, index: int) -> bool:
        return any(index in b.adapter_indices for b in self.batches.values())

    def _adapter_manager(self) -> AdapterManager:
        if self.adapters is None:
            raise RequestError("this model does not support dynamic adapters")
        return self.adapters

    def download_adapter(self, request: AdapterRequest) -> float:
        """(Loader thread.) Fetch and validate every adapter of the request; returns the share of the
        adapter memory budget it will take once loaded."""
        return self._adapter_manager().download(request)

    def adapter_chat_template(self, request: AdapterRequest) -> ChatTemplateFiles | None:
        """(Loader thread, after `download_adapter`.) The adapter's own chat template, with the base
        tokenizer's special tokens where the adapter's files name none."""
        template = self._adapter_manager().chat_template(request)
        if template is None:
            return None
        return ChatTemplateFiles(
            template.template,
            template.bos_token if template.bos_token is not None else self.tokenizer.bos_token or "",
            template.eos_token if template.eos_token is not None else self.tokenizer.eos_token or "",
        )

    def adapter_loaded(self, index: int, request: AdapterRequest) -> bool:
        """Whether `index` already holds exactly this request's adapter (then loading is a no-op)."""
        manager = self._adapter_manager()
        if index < 1:
            raise RequestError("adapter_index 0 is the base model")
        return manager.is_installed(index, request)

    def adapter_is_quick(self, request: AdapterRequest) -> bool:
        """Whether fetching and preparing the request takes milliseconds (small, and on the host or in a
        local directory): then it is done between steps rather than on a loader thread."""
        return self._adapter_manager().is_quick(request)

    def prepare_adapter(self, request: AdapterRequest) -> Modules:
        """(Loader thread, or between steps when quick.) The request's factors on the device, ready for
        `install_adapter`."""
        return self._adapter_manager().prepare(request)

    def adapter_memory_fraction(self, modules: Modules) -> float:
        """The share of the adapter memory budget prepared `modules` take on this shard."""
        return self._adapter_manager().budget_share(modules)

    def install_adapter(self, index: int, request: AdapterRequest, modules: Modules, if_fits: bool = False) -> bool:
        """Put the adapter at `index`, between steps; refused while running requests use another
        adapter at that index. When it does not fit the adapter memory budget: False with `if_fits`,
        else AdapterBudgetExceeded."""
        manager = self._adapter_manager()
        if index < 1:
            raise RequestError("adapter_index 0 is the base model")
        if manager.is_installed(index) and not manager.is_installed(index, request) and self.adapter_in_use(index):
            raise AdapterInUse(f"adapter index {index} holds another adapter that running requests use")
        if if_fits and not manager.fits(index, modules):
            return False
        manager.install(index, request, modules)
        return True

    def offload_adapter(self, index: int) -> bool:
        """Free `index` (False when it held nothing); refused while running requests use it."""
        if self.adapter_in_use(index):
            raise AdapterInUse(f"adapter index {index} is used by running requests")
        return self._adapter_manager().offload(index)

    def clear(self, batch_id: int | None = None) -> None:
        ids = list(self.batches) if batch_id is None else [batch_id]
        for b in ids:
            batch = self.batches.pop(b, None)
            if batch is not None and self.blocks is not None:
                batch.free(self.blocks)


def _pad_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
