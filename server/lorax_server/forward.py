"""Metadata for one forward pass over a ragged batch, built once on the host and passed to every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import slot_mapping


@dataclass
class LoraGroups:
    """The adapter segments laid out as a padded grid [segments, longest segment], so that every
    adapted linear can apply all of the batch's adapters with a few batched matmuls.

    `gather` reads the grid's cells from the token rows (padding cells read some row of their own
    segment and their results are never used); `inverse` reads each adapted token's result back from
    the flattened grid, for the tokens `span` (when the segments cover one contiguous range of tokens,
    as in a batch grouped by adapter) or `tokens`. Both gathers are None when the grid is exactly the
    span's rows (equal segments, nothing to pad)."""

    adapters: tuple[int, ...]  # the adapter index of each segment, in segment order
    longest: int
    gather: torch.Tensor | None  # [segments * longest] int64
    inverse: torch.Tensor | None  # [adapted tokens] int64
    span: tuple[int, int] | None
    tokens: torch.Tensor | None  # [adapted tokens] int64, when there is no span

    # Padding the grid to more than this many times the adapted tokens costs more than looping over
    # the segments (prefill batches with one long prompt and short ones).
    MAX_PADDING = 2.0

    @classmethod
    def build(cls, segments: list[tuple[int, int, int]], device: torch.device) -> LoraGroups | None:
        """None when there are fewer than two segments or the grid would pad too much."""
        if len(segments) < 2:
            return None
        longest = max(end - start for start, end, _ in segments)
        covered = sum(end - start for start, end, _ in segments)
        if len(segments) * longest > cls.MAX_PADDING * covered:
            return None
        adapters = tuple(index for _, _, index in segments)
        contiguous = all(a[1] == b[0] for a, b in zip(segments, segments[1:], strict=False))
        span = (segments[0][0], segments[-1][1]) if contiguous else None
        if contiguous and len(segments) * longest == covered:
            return cls(adapters, longest, None, None, span, None)
        gather, inverse, tokens = [], [], []
        for seg, (start, end, _) in enumerate(segments):
            gather += [*range(start, end), *[start] * (longest - (end - start))]
            inverse += range(seg * longest, seg * longest + end - start)
            tokens += range(start, end)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(adapters, longest, tensor(gather), tensor(inverse), span, None if contiguous else tensor(tokens))


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
    _adapter_slots: torch.Tensor | None = field(default=None, init=False, repr=False)  # see adapter_slots
    _lora_groups: LoraGroups | None | bool = field(default=False, init=False, repr=False)  # False: not built

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

    def lora_groups(self) -> LoraGroups | None:
        """The segments as a padded grid (see `LoraGroups`), built on first use; None when looping over
        the segments is the better plan."""
        if self._lora_groups is False:
            self._lora_groups = LoraGroups.build(self.lora_segments, self.input_ids.device)
        return self._lora_groups

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
