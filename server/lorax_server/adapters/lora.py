"""Segmented LoRA math (SGMV in plain torch) and the bookkeeping that ties adapters to base linears.

The batch's tokens are grouped by adapter; `segments` are `(start, end, adapter_index)` token ranges.
For every adapted linear the base matmul has already run once for all tokens; each segment then adds
`scale · B_a(A_a(x[start:end]))` for every part (q/k/v of a fused qkv, ...) its adapter targets.
All parts of one adapter share one shrink matmul (their A's are stacked). Rows whose adapter does not
touch a linear, and base-model rows, cost nothing.

Semantics (the oracle faster kernels are tested against):
    y[s:e, out_p] += scale_p * (x[s:e] @ A_p.T) @ B_p.T    for each segment and each adapted part p
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from ..layers.linear import Linear


@dataclass
class LoraModuleWeights:
    """One adapted module of one adapter."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]
    scale: float  # alpha / rank (alpha / sqrt(rank) with rslora)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense update scale·B·A: [out_features, in_features] (for tests and merges)."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())


@dataclass
class _Expand:
    out_start: int
    out_end: int
    r_start: int
    r_end: int
    b: torch.Tensor  # [out_end - out_start, r_end - r_start]
    scale: float


@dataclass
class _AdapterFactors:
    a: torch.Tensor  # [sum of ranks, in_features]: the A of every part this adapter updates
    expands: list[_Expand]


class LoraSlots:
    """The adapters currently installed on one (possibly fused) linear, by adapter index: the
    `layers.linear.LinearHook` that LoRA attaches."""

    def __init__(self, linear: Linear) -> None:
        bounds = [0]
        for size in linear.part_sizes:
            bounds.append(bounds[-1] + size)
        self.part_bounds = list(zip(bounds[:-1], bounds[1:], strict=True))
        self.by_adapter: dict[int, _AdapterFactors] = {}

    def install(self, index: int, parts: dict[int, LoraModuleWeights]) -> None:
        """parts: fused-part position → that part's factors (parts the adapter skips are absent)."""
        a_list, expands, r = [], [], 0
        for part, w in sorted(parts.items()):
            out_start, out_end = self.part_bounds[part]
            a_list.append(w.lora_a)
            expands.append(_Expand(out_start, out_end, r, r + w.rank, w.lora_b, w.scale))
            r += w.rank
        self.by_adapter[index] = _AdapterFactors(torch.cat(a_list) if len(a_list) > 1 else a_list[0], expands)

    def remove(self, index: int) -> None:
        self.by_adapter.pop(index, None)

    def adapter_indices(self) -> Collection[int]:
        return self.by_adapter.keys()

    def add_to(self, y: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]]) -> None:
        """y: [num_tokens, out_features] base output, updated in place; x: [num_tokens, in_features]."""
        for start, end, index in segments:
            factors = self.by_adapter.get(index)
            if factors is None:
                continue
            shrunk = x[start:end] @ factors.a.t()  # [n, sum of ranks]
            rows = y[start:end]
            for e in factors.expands:
                rows[:, e.out_start : e.out_end].addmm_(shrunk[:, e.r_start : e.r_end], e.b.t(), alpha=e.scale)


def attach_lora(targets: Mapping[str, tuple[Linear, int]]) -> dict[int, LoraSlots]:
    """Hook a `LoraSlots` onto every linear that `targets` (module name → (linear, fused part)) names.

    Returns the hooks by `id(linear)`. A linear that already carries one keeps it, so a second manager
    over the same model shares the installed adapters instead of hiding them.
    """
    slots: dict[int, LoraSlots] = {}
    for linear, _part in targets.values():
        if id(linear) not in slots:
            hook = linear.lora if isinstance(linear.lora, LoraSlots) else LoraSlots(linear)
            linear.lora = slots[id(linear)] = hook
    return slots


def segments_of(adapter_per_row: list[int], tokens_per_row: list[int]) -> list[tuple[int, int, int]]:
    """Token ranges of consecutive rows sharing a non-zero adapter index (rows are grouped by adapter)."""
    segments: list[tuple[int, int, int]] = []
    start = 0
    for index, n in zip(adapter_per_row, tokens_per_row, strict=True):
        if index and segments and segments[-1][2] == index and segments[-1][1] == start:
            segments[-1] = (segments[-1][0], start + n, index)
        elif index:
            segments.append((start, start + n, index))
        start += n
    return segments
