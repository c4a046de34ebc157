"""Affine integer weights (GPTQ, AWQ) once unpacked, whole or as a tensor-parallel rank's slice:

    W[n, k] = scales[g, n] · (codes[k, n] − zeros[g, n])  with  g = g_idx[k]

A reader unpacks the rank's codes itself (only it knows the packing) and reads the small per-group
tensors (scales, zeros, g_idx) whole; `shard_groups` cuts those to the rank's slice.

Output rows (column-parallel) are always exact: scales and zeros are stored per output row. Input
columns (row-parallel) take their groups along: the slice is exact when the groups its columns fall
into, renumbered, are uniform, which is what `GroupedWeight` stores (one group size, the last group
possibly smaller). A slice that starts on a group boundary always is. Act-order checkpoints scatter each
group over all input columns, so a slice usually holds unequal parts of its groups: refused, except
where the parts happen to be equal (for example groups that stay within each rank's columns).
The same rule serves FP8's block-wise scales (`input_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel import Range, ShardingError
from . import QuantizationError
from .grouped import GroupedWeight


def take_ranges(t: torch.Tensor, dim: int, ranges: tuple[Range, ...]) -> torch.Tensor:
    """The (start, size) `ranges` of `t` along `dim`, concatenated into a new tensor (`t` can go)."""
    return torch.cat([t.narrow(dim, start, size) for start, size in ranges], dim=dim)


@dataclass(frozen=True)
class InputGroups:
    """The groups of a slice of input columns, renumbered from 0 in the whole weight's group order."""

    g_idx: torch.Tensor  # [slice size] each column's renumbered group
    used: torch.Tensor  # [groups] the whole weight's group of each renumbered group
    size: int  # the renumbered groups' size (the last may be smaller)


def input_groups(g_idx: torch.Tensor, cols: Range, unit: str, what: str) -> InputGroups:
    """The groups of input columns `cols` of a weight whose column k is in group g_idx[k]; a
    `ShardingError` saying why when they are not uniform (`unit` names a group: "group", "block")."""
    start, size = cols
    used, local = torch.unique(g_idx[start : start + size], sorted=True, return_inverse=True)
    counts = torch.bincount(local, minlength=len(used))
    group = int(counts[0])
    if bool((counts[:-1] == group).all()) and int(counts[-1]) <= group:
        return InputGroups(local, used, group)
    columns = f"input columns {start}..{start + size} of {len(g_idx)}"
    if bool((g_idx[1:] >= g_idx[:-1]).all()):  # groups in order: the slice starts inside one
        full = int(torch.bincount(g_idx).max())
        raise ShardingError(
            f"{what}: the {unit} size {full} does not divide the start of this shard's slice ({columns}), "
            f"which would begin with part of a {unit}; use a number of shards that splits the input columns "
            f"on {unit} boundaries (multiples of {full}), or one shard"
        )
    raise ShardingError(
        f"{what}: the checkpoint is quantized with act-order (desc_act), whose groups are scattered over the "
        f"input columns: this shard's slice ({columns}) holds {int(counts.min())} to {int(counts.max())} "
        f"columns of each of its {len(used)} groups, and the groups of a sharded weight must be equal; serve "
        "it with one shard (--num-shard 1), or use a checkpoint quantized without desc_act"
    )


def shard_groups(
    scales: torch.Tensor,  # [groups, out]
    zeros: torch.Tensor,  # [groups, out]
    g_idx: torch.Tensor,  # [in]
    rows: tuple[Range, ...] | None,
    cols: Range | None,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole weight's per-group tensors cut to a rank's output `rows` (scales and zeros) or input
    `cols` (the groups those columns use, g_idx renumbered); as they are when neither is given."""
    if rows is not None:
        scales, zeros = take_ranges(scales, 1, rows), take_ranges(zeros, 1, rows)
    if cols is not None:
        groups = input_groups(g_idx, cols, "group", what)
        scales, zeros, g_idx = scales[groups.used], zeros[groups.used], groups.g_idx
    return scales, zeros, g_idx


def grouped_from_affine(
    codes: torch.Tensor,  # [out, in] integers
    bits: int,
    scales: torch.Tensor,  # [out, groups]
    zeros: torch.Tensor,  # [out, groups] integers
    g_idx: torch.Tensor,  # [in] group of each input channel
    what: str,
) -> GroupedWeight:
    """W = scales · (codes − zeros) per group, with the input channels sorted by group when the
    checkpoint's order is not already group by group (act-order)."""
    groups = scales.shape[1]
    perm = None
    if bool((g_idx[1:] < g_idx[:-1]).any()):
        perm = torch.argsort(g_idx, stable=True)
        codes, g_idx = codes[:, perm], g_idx[perm]
    counts = torch.bincount(g_idx, minlength=groups)
    group_size = int(counts[0])
    uniform = bool((counts[:-1] == group_size).all()) and 0 < int(counts[-1]) <= group_size
    if not uniform:
        raise QuantizationError(f"{what}: groups of unequal sizes {counts.tolist()} are not supported")
    offsets = -zeros.float() * scales
    table = torch.arange(2**bits, dtype=torch.float32, device=codes.device)
    return GroupedWeight.from_codes(codes, bits, table, scales, offsets, group_size, perm)
