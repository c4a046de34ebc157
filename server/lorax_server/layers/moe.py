"""Sparse mixture-of-experts MLP (top-k routing, optionally renormalised) with per-expert LoRA.

Tokens are grouped by expert once per layer (one sort), then each expert runs one batched SwiGLU on
its tokens and scatters the weighted result back: a loop over experts, never over tokens.

With adapters on the experts, rows are sorted by (expert, adapter) instead, so each expert's rows come
as contiguous adapter segments: the expert's `Linear`s then add each segment's LoRA update exactly as
a dense linear does for the whole batch (a loop over experts and over adapter segments within one).

Grouping needs the per-expert counts on the host (one sync per layer). On a GPU, small steps (decode)
run every expert on every token instead, weighted by its routing weight (0 where not chosen): no sync,
so the step can be captured in a CUDA graph. A decode step reads every expert's weights either way
and its matmuls are bound by that reading, so the num_experts/top_k times more arithmetic should cost
little (an estimate: not yet measured on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from .linear import Linear
from .parallel import SINGLE, TensorParallel

if TYPE_CHECKING:
    from ..forward import ForwardBatch

# Per device type, the most tokens a step may have for every expert to run on every token (see the
# module's docstring); absent: the experts always run on their own tokens. On CPUs arithmetic is what
# costs, so they keep the grouped path.
EVERY_EXPERT_MAX_TOKENS = {"cuda": 64}


class ExpertRows(NamedTuple):
    """What an expert's linears need of the batch: the adapter segments of the rows routed to it."""

    lora_segments: list[tuple[int, int, int]]  # (start, end, adapter_index), offsets into the expert's rows
    pinned_stacks: bool = False  # never: experts' rows are not replayed from graphs


class SparseMoE:
    def __init__(
        self,
        gate: Linear,
        gate_up: list[Linear],  # per expert: its gate rows, then its up rows
        down: list[Linear],  # per expert
        top_k: int,
        act: Callable[[torch.Tensor], torch.Tensor],
        norm_p: float | None = 1.0,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """`norm_p`: the top-k weights are divided by their p-norm (Mixtral: 1, i.e. they sum to 1);
        None keeps the softmax probabilities. Experts whose linears have no `part_names` cannot be adapted.
        `tp`: under tensor parallelism each expert holds a slice of its intermediate rows; the experts'
        partial outputs are summed over the ranks once per layer."""
        self.tp = tp
        self.gate = gate  # router: [num_tokens, hidden] → [num_tokens, experts]
        self.top_k, self.act, self.norm_p = top_k, act, norm_p
        self.num_experts = len(gate_up)
        self.gate_up, self.down = gate_up, down  # what adapters attach to

    def linears(self) -> list[Linear]:
        """The router, then every expert's gate|up and down (what adapters may target)."""
        return [self.gate, *self.gate_up, *self.down]

    def route(self, x: torch.Tensor, meta: ForwardBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [num_tokens, top_k] (in x's dtype) and chosen experts [num_tokens, top_k]."""
        probs = torch.softmax(self.gate(x, meta).float(), dim=-1)  # [num_tokens, experts]
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_p == 1:
            weights = weights / weights.sum(-1, keepdim=True)
        elif self.norm_p is not None:
            weights = weights / torch.linalg.vector_norm(weights, ord=self.norm_p, dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def __call__(self, x: torch.Tensor, meta: ForwardBatch | None = None) -> torch.Tensor:
        """x: [num_tokens, hidden] → [num_tokens, hidden]."""
        weights, experts = self.route(x, meta)
        if x.shape[0] <= EVERY_EXPERT_MAX_TOKENS.get(x.device.type, 0):
            return self.tp.all_reduce(self._every_expert(x, meta, weights, experts))
        key = experts.flatten()  # [num_tokens * top_k], token t's choices at t*top_k ... t*top_k + top_k - 1
        adapters = self._adapters_in(meta)
        slots = len(adapters) + 1  # slot 0: no adapter
        if adapters:
            key = key * slots + meta.adapter_slots().repeat_interleave(self.top_k)
        order = torch.argsort(key, stable=True)
        tokens = order // self.top_k  # token of each (token, choice) pair, grouped by (expert, adapter)
        routed_weights = weights.flatten()[order]
        counts = torch.bincount(key, minlength=self.num_experts * slots).view(self.num_experts, slots)
        out = torch.zeros_like(x)
        start = 0
        for e, per_slot in enumerate(counts.tolist()):  # one sync per layer
            n = sum(per_slot)
            if not n:
                continue
            idx = tokens[start : start + n]
            rows = ExpertRows(_segments(per_slot, adapters))
            gate, up = self.gate_up[e](x[idx], rows).split(self.gate_up[e].out_splits, dim=-1)
            h = self.down[e](self.act(gate) * up, rows)
            out.index_add_(0, idx, h * routed_weights[start : start + n, None])
            start += n
        return self.tp.all_reduce(out)

    def _every_expert(
        self, x: torch.Tensor, meta: ForwardBatch | None, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Every expert on all of x, summed in expert order with each token's routing weight (zero for
        experts it did not choose, which adds exactly nothing). The batch's own adapter segments apply
        as they stand, since every expert sees every row."""
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        dense.scatter_(1, experts, weights)  # [num_tokens, experts]
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            gate, up = self.gate_up[e](x, meta).split(self.gate_up[e].out_splits, dim=-1)
            out += self.down[e](self.act(gate) * up, meta) * dense[:, e, None]
        return out

    def _adapters_in(self, meta: ForwardBatch | None) -> list[int]:
        """The batch's adapters, when any of them has LoRA on this layer's experts (else none)."""
        if meta is None or not meta.lora_segments:
            return []
        adapters = meta.lora_adapters()
        on_experts = {
            index
            for linear in self.gate_up + self.down
            if linear.lora is not None
            for index in linear.lora.adapter_indices()
        }
        return adapters if on_experts.intersection(adapters) else []


def _segments(per_slot: list[int], adapters: list[int]) -> list[tuple[int, int, int]]:
    """An expert's rows, counted per adapter slot in slot order → its adapter segments."""
    segments, start = [], per_slot[0]
    for index, n in zip(adapters, per_slot[1:], strict=True):
        if n:
            segments.append((start, start + n, index))
        start += n
    return segments
