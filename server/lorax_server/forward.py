"""Metadata for one forward pass over a ragged batch, built once on the host and passed to every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import slot_mapping

# Steps whose sequences each feed at most this many tokens (decode steps, speculative steps' drafts)
# apply every adapter of the batch at once and are attended token by token by the decode kernel;
# longer runs are prompts (adapters looped over by segment, attention over a padded grid).
SHORT_QUERIES = 8


@dataclass
class LoraGroups:
    """The adapted tokens laid out as a padded grid [adapters, most tokens of one adapter], one row per
    adapter in `adapters` order, so that every adapted linear can apply all of the batch's adapters
    with a few batched matmuls over their factors stacked in that order.

    `gather` reads the grid's cells from the token rows (padding cells read some token and their
    results are never used; a row may be all padding when its adapter has no tokens in this batch);
    `inverse` reads each adapted token's result back from the flattened grid, for the tokens `span`
    (when the segments cover one contiguous range of tokens, as in a batch grouped by adapter) or
    `tokens`. Both gathers are None when the grid is exactly the span's rows."""

    adapters: tuple[int, ...]  # the adapter of each grid row
    longest: int
    gather: torch.Tensor | None  # [len(adapters) * longest] int64
    inverse: torch.Tensor | None  # [adapted tokens] int64
    span: tuple[int, int] | None
    tokens: torch.Tensor | None  # [adapted tokens] int64, when there is no span

    # Padding the grid to more than this many times the adapted tokens costs more than looping over
    # the segments (a decode batch where one adapter has most of the rows).
    MAX_PADDING = 2.0

    @classmethod
    def build(
        cls, segments: list[tuple[int, int, int]], device: torch.device, order: tuple[int, ...] | None = None
    ) -> LoraGroups | None:
        """Rows in `order` (default: the segments' adapters as they come), which must hold every
        adapter of the segments. None when there are fewer than two segments or, without an order,
        when the grid would pad too much."""
        if len(segments) < 2:
            return None
        tokens_of: dict[int, list[int]] = {}
        for start, end, index in segments:
            tokens_of.setdefault(index, []).extend(range(start, end))
        adapters = order if order is not None else tuple(tokens_of)
        longest = max(len(t) for t in tokens_of.values())
        covered = sum(end - start for start, end, _ in segments)
        if order is None and len(adapters) * longest > cls.MAX_PADDING * covered:
            return None
        contiguous = all(a[1] == b[0] for a, b in zip(segments, segments[1:], strict=False))
        span = (segments[0][0], segments[-1][1]) if contiguous else None
        if contiguous and len(adapters) * longest == covered and adapters == tuple(i for _, _, i in segments):
            return cls(adapters, longest, None, None, span, None)
        gather, cell_of = [], {}
        for row, index in enumerate(adapters):
            own = tokens_of.get(index, [])
            for k, token in enumerate(own):
                cell_of[token] = row * longest + k
            gather += [*own, *[own[0] if own else segments[0][0]] * (longest - len(own))]
        in_order = [token for start, end, _ in segments for token in range(start, end)]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        inverse = tensor([cell_of[t] for t in in_order])
        return cls(adapters, longest, tensor(gather), inverse, span, None if contiguous else tensor(in_order))


@dataclass
class LoraKernelRows:
    """The adapted tokens as the LoRA kernels read them (`layers.triton.lora`, `adapters.lora_cpu`), for
    factors stacked in `adapters` order: each segment's token range and stack slot (SGMV), and on steps
    of short queries each token's slot, -1 for tokens without an adapter (BGMV). Built on the host from
    the segments and copied to the device in one asynchronous transfer; the grid sizes are host values,
    so launching the kernels never waits on the device."""

    adapters: tuple[int, ...]  # the adapter of each stack slot
    seg_start: torch.Tensor  # [segments] int32
    seg_end: torch.Tensor  # [segments] int32
    seg_slot: torch.Tensor  # [segments] int32, -1 for an adapter outside `adapters`
    longest: int  # host copy: the most tokens in one segment (the SGMV grid)
    row_slot: torch.Tensor | None  # [num_tokens] int32 on steps of short queries (decode, drafts), else None

    @staticmethod
    def row_slots(segments: list[tuple[int, int, int]], num_tokens: int, order: tuple[int, ...]) -> list[int]:
        """Each token's slot in a stack of the adapters `order`; -1 for tokens without one there."""
        slot_of = {index: slot for slot, index in enumerate(order)}
        row_slot = [-1] * num_tokens
        for start, end, index in segments:
            row_slot[start:end] = [slot_of.get(index, -1)] * (end - start)
        return row_slot

    @classmethod
    def build(
        cls,
        segments: list[tuple[int, int, int]],
        num_tokens: int,
        device: torch.device,
        order: tuple[int, ...] | None = None,
        per_token: bool = False,
    ) -> LoraKernelRows:
        """Slots in `order` (default: the segments' adapters as they first come)."""
        adapters = order if order is not None else tuple(dict.fromkeys(index for _, _, index in segments))
        slot_of = {index: slot for slot, index in enumerate(adapters)}
        slots = [slot_of.get(index, -1) for _, _, index in segments]
        values = [start for start, _, _ in segments] + [end for _, end, _ in segments] + slots
        if per_token:
            values += cls.row_slots(segments, num_tokens, adapters)
        host = torch.tensor(values, dtype=torch.int32)
        if device.type == "cuda":  # pinned, the copy queues on the stream instead of waiting for it
            host = host.pin_memory()
        packed = host.to(device, non_blocking=True)
        n = len(segments)
        longest = max((end - start for start, end, _ in segments), default=0)
        row = packed[3 * n :] if per_token else None
        return cls(adapters, packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n], longest, row)


@dataclass
class ForwardBatch:
    """Tokens of several sequences laid end to end (no padding in the linear layers).

    Each sequence contributes `query_lens[b]` new tokens whose keys/values are written to the cache,
    then attends to its first `context_lens[b]` cached tokens (which include the new ones).
    """

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64, position of each token in its sequence
    seq_index: torch.Tensor  # [num_tokens] int64, which sequence each token belongs to
    seq_lens: torch.Tensor  # [num_tokens] int64, length of the token's sequence after this step
    slots: torch.Tensor  # [num_tokens] int64, KV cache slot each token's key/value is written to
    block_tables: torch.Tensor  # [batch, max_blocks] int64
    context_lens: torch.Tensor  # [batch] int64, cached tokens each sequence attends to
    query_start: torch.Tensor  # [batch] int64, offset of each sequence's first new token
    max_query_len: int  # host copy: longest run of new tokens
    max_context_len: int  # host copy: longest context
    logits_index: torch.Tensor  # [num_logits] int64, tokens whose logits are wanted
    # (start, end, adapter_index) token ranges that use an adapter; tokens are grouped by adapter.
    lora_segments: list[tuple[int, int, int]] = field(default_factory=list)
    # Attention backends cache derived tensors (masks, gather indices) here, once per forward pass.
    backend_state: dict = field(default_factory=dict)
    # Host copies of the per-sequence lengths (empty when the batch was built without them).
    host_query_lens: list[int] = field(default_factory=list)
    host_context_lens: list[int] = field(default_factory=list)
    # A captured decode graph's batch (`decode_graphs`): each adapted linear applies the stack of factors
    # it kept, with per-token slots from `lora_kernel_rows`, which the graph fills before each replay.
    pinned_stacks: bool = False
    _adapter_slots: torch.Tensor | None = field(default=None, init=False, repr=False)  # see adapter_slots
    _lora_groups: dict = field(default_factory=dict, init=False, repr=False)  # see lora_groups
    _lora_kernel_rows: dict = field(default_factory=dict, init=False, repr=False)  # see lora_kernel_rows
    _lora_order: tuple[int, ...] | None = field(default=None, init=False, repr=False)  # see lora_order

    @property
    def batch_size(self) -> int:
        return self.context_lens.shape[0]

    def lora_adapters(self) -> list[int]:
        """The distinct adapter indices of `lora_segments`, ascending."""
        return sorted({index for _, _, index in self.lora_segments})

    def adapter_slots(self) -> torch.Tensor:
        """[num_tokens] int64: 1 + the position of each token's adapter in `lora_adapters()`, 0 for
        tokens without one. Built on first use (by layers that regroup tokens, such as MoE experts),
        on the host from the segments, then copied to the device once per forward pass."""
        if self._adapter_slots is None:
            slot_of = {index: slot for slot, index in enumerate(self.lora_adapters(), start=1)}
            values, lengths, pos = [], [], 0
            for start, end, index in sorted(self.lora_segments):
                values += [0, slot_of[index]]
                lengths += [start - pos, end - start]
                pos = end
            values.append(0)
            lengths.append(self.input_ids.shape[0] - pos)
            slots = torch.tensor(values).repeat_interleave(torch.tensor(lengths))
            self._adapter_slots = slots.to(self.input_ids.device)
        return self._adapter_slots

    def lora_groups(self, order: tuple[int, ...] | None = None) -> LoraGroups | None:
        """On a step of short queries (decode steps, speculative steps' drafts), the adapted tokens as a
        padded grid with rows in `order` (see `LoraGroups`), built once per order; None when looping over
        the segments is the better plan (a step with a prompt in it)."""
        if self.max_query_len > SHORT_QUERIES:  # prompts: long segments, which the loop adds in place
            return None
        if order not in self._lora_groups:
            self._lora_groups[order] = LoraGroups.build(self.lora_segments, self.input_ids.device, order)
        return self._lora_groups[order]

    def lora_order(self) -> tuple[int, ...]:
        """The distinct adapters of `lora_segments` as they first come (the kernels' stack order)."""
        if self._lora_order is None:
            self._lora_order = tuple(dict.fromkeys(index for _, _, index in self.lora_segments))
        return self._lora_order

    def lora_kernel_rows(self, order: tuple[int, ...] | None = None) -> LoraKernelRows:
        """The segments as the Triton LoRA kernels read them, slots in `order` (default: `lora_order()`),
        with per-token slots on steps of short queries; built once per order and forward pass, so the
        batch's adapted linears share one host-to-device copy."""
        order = order if order is not None else self.lora_order()
        if order not in self._lora_kernel_rows:
            short = self.max_query_len <= SHORT_QUERIES
            self._lora_kernel_rows[order] = LoraKernelRows.build(
                self.lora_segments, self.input_ids.shape[0], self.input_ids.device, order, short
            )
        return self._lora_kernel_rows[order]

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: torch.Tensor,
        block_size: int,
        logits_index: torch.Tensor | None = None,
        lora_segments: list[tuple[int, int, int]] | None = None,
        rope_lens: list[int] | None = None,
    ) -> ForwardBatch:
        """Derive every per-token tensor from per-sequence lengths.

        input_ids: [num_tokens] on the target device; query_lens/context_lens: host lists, one per sequence.
        rope_lens: the sequence length rotary frequencies see (default: context_lens); a chunk of a prompt
        gives the whole prompt's, so it is rotated as the whole prompt would be.
        """
        device = input_ids.device
        q_lens = torch.tensor(query_lens, dtype=torch.int64, device=device)  # [batch]
        ctx = torch.tensor(context_lens, dtype=torch.int64, device=device)  # [batch]
        num_tokens = input_ids.shape[0]
        seq_index = torch.repeat_interleave(
            torch.arange(len(query_lens), device=device), q_lens, output_size=num_tokens
        )
        query_start = torch.cumsum(q_lens, 0) - q_lens
        offset_in_query = torch.arange(num_tokens, device=device) - query_start[seq_index]
        positions = (ctx - q_lens)[seq_index] + offset_in_query
        rope_ctx = ctx if rope_lens is None else torch.tensor(rope_lens, dtype=torch.int64, device=device)
        if logits_index is None:
            logits_index = torch.cumsum(q_lens, 0) - 1  # last token of each sequence
        return cls(
            input_ids=input_ids,
            positions=positions,
            seq_index=seq_index,
            seq_lens=rope_ctx[seq_index],
            slots=slot_mapping(block_tables, seq_index, positions, block_size),
            block_tables=block_tables,
            context_lens=ctx,
            query_start=query_start,
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            logits_index=logits_index,
            lora_segments=lora_segments or [],
            host_query_lens=list(query_lens),
            host_context_lens=list(context_lens),
        )
