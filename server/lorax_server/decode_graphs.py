"""Decode steps replayed from CUDA graphs (`--compile`, LoRAX's flag).

A decode step of a small batch on a GPU is bound by launching its few hundred small kernels, not by
running them. A CUDA graph records one step's launches once and replays them all with one call. What
a graph reads must stay at the addresses it was captured with, so every captured batch size (a bucket)
runs on a static `ForwardBatch`: before a replay the step's tensors are copied into its first rows, and
the rows beyond the batch are padding that writes its keys and values to a scratch KV block no sequence
owns (the engine keeps one back) and whose logits are dropped.

Served (`DecodeGraphs.serves`): plain decode steps (one new token per row) of up to the largest bucket,
over the Triton attention backend and LoRA kernels, whose launches depend on shapes only; unsharded
models; MoE models up to the batch size whose experts run without a host sync (`layers.moe`).

Adapters: a graph reads, for every adapted linear, the stack of adapter factors that linear kept when
the graph was captured (`ForwardBatch.pinned_stacks`), and each row's slot in it from a static buffer
filled before each replay. Before every step each linear's stack is brought up to date exactly as an
eager step would; when any stack changed (an adapter new to the batch), the graphs are dropped, steps
run eagerly, and graphs are captured again once the stacks have stayed the same for STABLE_STEPS steps
(a capture costs about two eager steps, so adapters churning at every step never pay for one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .adapters import lora
from .adapters.lora import LoraSlots
from .forward import ForwardBatch, LoraKernelRows
from .kv_cache import KVCache
from .layers import moe

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
STABLE_STEPS = 8

# capture(run, pool) -> (replay, output): records `run` (which returns the logits tensor) and returns
# a function replaying it and the tensor each replay writes its logits to.
Capture = Callable[[Callable[[], torch.Tensor], object], tuple[Callable[[], None], torch.Tensor]]


def capture_cuda_graph(run: Callable[[], torch.Tensor], pool: object) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture `run` in a CUDA graph, after one run on a side stream (Triton compiles its kernels and
    the allocator settles outside the capture, as CUDA graphs require)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        logits = run()
    return graph.replay, logits


def replay_eagerly(run: Callable[[], torch.Tensor], pool: object) -> tuple[Callable[[], None], torch.Tensor]:
    """What a replay computes, run eagerly on the same static tensors: the reference the tests use to
    check everything around the capture (buckets, padding, static inputs, pinned stacks) on a CPU."""
    logits = run()

    @torch.inference_mode()  # the logits are an inference tensor, as a captured graph's output is
    def replay() -> None:
        logits.copy_(run())

    return replay, logits


CAPTURE_BY_DEVICE: dict[str, Capture] = {"cuda": capture_cuda_graph}


@dataclass
class _Graph:
    size: int
    meta: ForwardBatch
    replay: Callable[[], None]
    logits: torch.Tensor  # [size, vocab], rewritten by every replay


class DecodeGraphs:
    """The engine's decode forward with CUDA graphs where they apply: `forward(meta, cache)` is
    `model.forward(meta, cache)` for any batch, replayed from a graph when `serves(meta)`."""

    def __init__(
        self,
        model,  # noqa: ANN001 - a CausalLM
        cache: KVCache,
        scratch_block: int,
        max_blocks: int,
        max_batch: int = BUCKETS[-1],
    ) -> None:
        """`scratch_block`: a block of `cache` no sequence owns; `max_blocks`: the widest block table;
        `max_batch`: larger decode batches run eagerly (`--compile-max-batch-size`)."""
        self.model, self.cache, self.capture = model, cache, CAPTURE_BY_DEVICE[model.device.type]
        self.pool = torch.cuda.graph_pool_handle() if cache.keys[0].is_cuda else None
        is_moe = any(isinstance(layer.mlp, moe.SparseMoE) for layer in model.layers)
        limit = min(moe.EVERY_EXPERT_MAX_TOKENS.get(model.device.type, 0) if is_moe else BUCKETS[-1], max_batch)
        self.buckets = tuple(b for b in BUCKETS if b <= limit)
        self.lora_slots = list({id(s): s for s, _ in _lora_hooks(model)}.values())
        size, dev, bs = self.buckets[-1] if self.buckets else 0, model.device, cache.block_size
        scratch_slot = scratch_block * bs
        # Static inputs of the largest bucket; smaller buckets read their first rows. Padding rows sit
        # at position 0 of the scratch block, with a context of that one token.
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(size, dtype=torch.int64, device=dev)
        self.slots = torch.full((size,), scratch_slot, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((size, max_blocks), scratch_block, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(size, dtype=torch.int64, device=dev)
        self.rows = torch.arange(size, dtype=torch.int64, device=dev)
        self.pad = (scratch_block, scratch_slot)
        self.row_slots: dict[tuple[int, ...], torch.Tensor] = {}  # stack order → [size] int32
        self.graphs: dict[int, _Graph] = {}
        self.signature: tuple[int, ...] = ()  # the serials of the linears' kept stacks
        self.checked: tuple[int, set[int]] = (-1, set())  # `lora.changes()` and the adapters last checked
        self.stable_steps = 0
        self.captures = self.replays = 0  # counted for tests and logs
        log.info("--compile: decode steps of up to %d rows replay CUDA graphs", size)

    def serves(self, meta: ForwardBatch) -> bool:
        """A plain decode step that fits a bucket."""
        return (
            bool(self.buckets)
            and meta.max_query_len == 1
            and meta.input_ids.shape[0] == meta.batch_size <= self.buckets[-1]
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def forward(self, meta: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """The logits of `meta`'s rows [batch, vocab]. From a replay they are a view of the graph's
        output, valid until its next replay (the engine samples from them at once)."""
        if cache is not self.cache or not self.serves(meta):
            return self.model.forward(meta, cache)
        self._check_stacks(meta.lora_order())
        self.stable_steps += 1
        n = meta.batch_size
        bucket = next(b for b in self.buckets if b >= n)
        graph = self.graphs.get(bucket)
        if graph is None:
            if self.stable_steps < STABLE_STEPS:
                return self.model.forward(meta, cache)
            try:
                graph = self.graphs[bucket] = self._capture(bucket)
            except Exception:  # an op that cannot be captured (some quantized matmuls sync): stay eager
                log.exception("--compile: capturing the decode graph of %d rows failed; decoding eagerly", bucket)
                self.buckets = ()
                return self.model.forward(meta, cache)
        self._load(meta, bucket)
        graph.replay()
        self.replays += 1
        return graph.logits[:n]

    def _check_stacks(self, adapters: tuple[int, ...]) -> None:
        """Bring every linear's kept stack up to date for `adapters`, as the eager step would; drop the
        graphs when a stack changed. Skipped while no stack changed since the last check and the
        adapters are among those checked then (a steady batch costs no loop over the linears)."""
        unchanged = lora.changes() == self.checked[0]
        if unchanged and self.checked[1].issuperset(adapters):
            return
        signature = tuple(slots.keep_stack_for(adapters) for slots in self.lora_slots)
        same = signature == self.signature
        # What was checked before still holds only if nothing changed since, not even in this check.
        self.checked = (lora.changes(), self.checked[1] | set(adapters) if same and unchanged else set(adapters))
        if not same:
            self.graphs.clear()
            self.row_slots.clear()
            self.signature, self.stable_steps = signature, 0

    def _capture(self, size: int) -> _Graph:
        for slots in self.lora_slots:  # a static slot buffer for every order a kept stack has
            if slots.kept_order is not None and slots.kept_order not in self.row_slots:
                self.row_slots[slots.kept_order] = torch.full(
                    (self.buckets[-1],), -1, dtype=torch.int32, device=self.model.device
                )
        meta = ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            seq_index=self.rows[:size],
            seq_lens=self.seq_lens[:size],
            slots=self.slots[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            query_start=self.rows[:size],
            max_query_len=1,
            max_context_len=self.block_tables.shape[1] * self.cache.block_size,
            logits_index=self.rows[:size],
            pinned_stacks=True,
        )
        empty = torch.zeros(0, dtype=torch.int32, device=self.model.device)
        for order, row_slot in self.row_slots.items():  # built here: a capture must not copy from the host
            meta._lora_kernel_rows[order] = LoraKernelRows(order, empty, empty, empty, 0, row_slot[:size])
        self._load(None, size)  # every row padding: the capture's runs write only the scratch block

        def run() -> torch.Tensor:
            meta.backend_state.clear()  # the backends' per-pass tensors are built inside the graph
            return self.model.forward(meta, self.cache)

        replay, logits = self.capture(run, self.pool)
        self.captures += 1
        log.info("captured the decode graph of %d rows (%d captured so far)", size, self.captures)
        return _Graph(size, meta, replay, logits)

    def _load(self, meta: ForwardBatch | None, size: int) -> None:
        """The step's rows into the static inputs, padding after them up to `size`."""
        n = 0 if meta is None else meta.batch_size
        if meta is not None:
            self.input_ids[:n].copy_(meta.input_ids)
            self.positions[:n].copy_(meta.positions)
            self.seq_lens[:n].copy_(meta.seq_lens)
            self.slots[:n].copy_(meta.slots)
            self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
            self.context_lens[:n].copy_(meta.context_lens)
            if self.row_slots:
                orders = list(self.row_slots)
                rows = [LoraKernelRows.row_slots(meta.lora_segments, n, order) for order in orders]
                host = torch.tensor(rows, dtype=torch.int32).view(len(orders), n)
                fresh = host.pin_memory() if self.input_ids.is_cuda else host
                stacked = fresh.to(self.input_ids.device, non_blocking=True)
                for order, values in zip(orders, stacked, strict=True):
                    self.row_slots[order][:n].copy_(values)
        scratch_block, scratch_slot = self.pad
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.seq_lens[n:size].fill_(1)
        self.slots[n:size].fill_(scratch_slot)
        self.block_tables[n:size, 0].fill_(scratch_block)
        self.context_lens[n:size].fill_(1)
        for row_slot in self.row_slots.values():
            row_slot[n:size].fill_(-1)


def available(model) -> bool:  # noqa: ANN001
    """Whether decode graphs apply to this model on its device; logs why not."""
    backend = getattr(getattr(model, "backend", None), "name", None)
    reason = None
    if model.device.type not in CAPTURE_BY_DEVICE:
        reason = f"CUDA graphs need a CUDA device, not {model.device.type}"
    elif backend != "triton":
        reason = f"CUDA graphs need the triton attention backend, not {backend}"
    elif lora.kernels() != "triton":  # chosen with the attention backend; the torch plans need host data
        reason = f"CUDA graphs need the triton LoRA kernels, not {lora.kernels()}"
    elif getattr(model, "tp", None) is not None and model.tp.sharded:
        reason = "CUDA graphs are not captured for sharded models"
    if reason is not None:
        log.warning("--compile: %s; decode steps run eagerly", reason)
    return reason is None


def _lora_hooks(model) -> list[tuple[LoraSlots, int]]:  # noqa: ANN001
    """The LoRA hooks on the model's adaptable linears (attached once, when the adapter manager starts)."""
    adaptable = model.adaptable_linears() if hasattr(model, "adaptable_linears") else {}
    return [(linear.lora, part) for linear, part in adaptable.values() if isinstance(linear.lora, LoraSlots)]
