"""Segmented LoRA math (SGMV in plain torch) and the bookkeeping that ties adapters to base linears.

The batch's tokens are grouped by adapter; `segments` are `(start, end, adapter_index)` token ranges.
For every adapted linear the base matmul has already run once for all tokens; each segment then adds
`scale · B_a(A_a(x[start:end]))` for every part (q/k/v of a fused qkv, ...) its adapter targets.
All parts of one adapter share one shrink matmul (their A's stacked) and one expand matmul (their
B's block-diagonal, scale folded in). Rows whose adapter does not touch a linear, and base-model rows,
cost nothing.

Semantics (the oracle faster kernels are tested against):
    y[s:e, out_p] += scale_p * (x[s:e] @ A_p.T) @ B_p.T    for each segment and each adapted part p
"""

from __future__ import annotations

from collections.abc import Iterator
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
class _AdapterFactors:
    """One adapter's update of one linear as two matmuls: y[:, out_start:out_end] += (x @ a_t) @ b_t."""

    a_t: torch.Tensor  # [in_features, sum of ranks]: the A of every part this adapter updates
    b_t: torch.Tensor  # [sum of ranks, out_end - out_start]: each part's scale·B^T in its own block
    out_start: int
    out_end: int


class LoraSlots:
    """The adapters currently installed on one (possibly fused) linear, by adapter index."""

    def __init__(self, linear: Linear) -> None:
        bounds = [0]
        for size in linear.part_sizes:
            bounds.append(bounds[-1] + size)
        self.part_bounds = list(zip(bounds[:-1], bounds[1:], strict=True))
        self.by_adapter: dict[int, _AdapterFactors] = {}

    def install(self, index: int, parts: dict[int, LoraModuleWeights]) -> None:
        """parts: fused-part position → that part's factors (parts the adapter skips are absent).

        The parts' B's become one block-diagonal expand over the output columns they span, so a
        segment costs two matmuls however many parts (q, k, v, ...) the adapter updates.
        """
        ordered = sorted(parts.items())
        out_start, out_end = self.part_bounds[ordered[0][0]][0], self.part_bounds[ordered[-1][0]][1]
        first = ordered[0][1].lora_b
        b_t = first.new_zeros(sum(w.rank for _, w in ordered), out_end - out_start)
        r = 0
        for part, w in ordered:
            lo, hi = self.part_bounds[part]
            b_t[r : r + w.rank, lo - out_start : hi - out_start] = (w.lora_b.float() * w.scale).t().to(b_t.dtype)
            r += w.rank
        a_t = torch.cat([w.lora_a for _, w in ordered]).t().contiguous()
        self.by_adapter[index] = _AdapterFactors(a_t, b_t, out_start, out_end)

    def remove(self, index: int) -> None:
        self.by_adapter.pop(index, None)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]]) -> None:
        """y: [num_tokens, out_features] base output, updated in place; x: [num_tokens, in_features]."""
        for start, end, index in segments:
            f = self.by_adapter.get(index)
            if f is not None:
                y[start:end, f.out_start : f.out_end].addmm_(x[start:end] @ f.a_t, f.b_t)


def iter_linears(obj: object, _seen: set[int] | None = None) -> Iterator[Linear]:
    """Every `Linear` reachable from a model object through attributes and lists."""
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Linear):
        yield obj
        return
    children = obj if isinstance(obj, list | tuple) else getattr(obj, "__dict__", {}).values()
    for child in children:
        if isinstance(child, Linear | list | tuple) or type(child).__module__.startswith("lorax_server."):
            yield from iter_linears(child, seen)


def attach_lora(model: object, adaptable: tuple[str, ...]) -> dict[str, tuple[Linear, int]]:
    """Give every linear with an adaptable part a `LoraSlots`; return module name → (linear, part)."""
    targets: dict[str, tuple[Linear, int]] = {}
    for linear in iter_linears(model):
        for part, name in enumerate(linear.part_names):
            if name.rsplit(".", 1)[-1] in adaptable:
                targets[name] = (linear, part)
                if linear.lora is None:
                    linear.lora = LoraSlots(linear)
    return targets


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
