"""`awq`: pre-quantized AWQ checkpoints in AutoAWQ's GEMM layout (4 bits).

Per linear module: `qweight` int32 [in, out/8] and `qzeros` int32 [groups, out/8], both packed along the
output dimension with an interleaved order (nibble i of a word holds output column ORDER[i] of its 8),
and `scales` [groups, out]. W[n, k] = scales[g, n] · (q[k, n] − zero[g, n]) with g = k // group_size.
Under tensor parallelism a rank reads only the words that hold its output rows (any ranges) or input
columns (exact when they keep whole groups, see `affine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...utils.weights import Weights
from ..parallel import Range
from . import QuantizationError, stored_shape
from .affine import grouped_from_affine, shard_groups, take_ranges
from .grouped import GroupedWeight

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of each word holds column ORDER[i] of its group of 8


def unpack_columns(words: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 [rows, columns/8] in AWQ's interleaved order → int64 [rows, columns]."""
    shifts = 4 * torch.arange(8, device=words.device)
    nibbles = ((words.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & 15  # [rows, columns/8, 8]
    out = torch.empty_like(nibbles)
    out[:, :, list(ORDER)] = nibbles
    return out.view(words.shape[0], columns)


@dataclass(frozen=True)
class AwqCheckpoint:
    group_size: int | None = None  # None: inferred from the scales' shape
    method: str = "awq"
    dense_modules: tuple[str, ...] = ()  # quantization_config's modules_to_not_convert

    def load(
        self,
        weights: Weights,
        prefix: str,
        shape: tuple[int, int] | None,
        required: bool,
        rows: tuple[Range, ...] | None = None,
        cols: Range | None = None,
    ) -> GroupedWeight | None:
        """The module's weight, or this rank's output `rows` or input `cols` of it (see `affine`)."""
        shape = stored_shape(self.method, weights.has, prefix, shape, required, self.dense_modules)
        if shape is None:
            return None
        out_features, in_features = shape
        if out_features % 8:
            raise QuantizationError(f"AWQ packs 8 outputs per word; {prefix} has {out_features}")
        scales = weights.get(f"{prefix}.scales").float()  # [groups, out]
        groups = scales.shape[0]
        size = self.group_size if self.group_size not in (None, -1) else -(-in_features // groups)
        if scales.shape[1] != out_features or -(-in_features // size) != groups:
            raise QuantizationError(f"{prefix}.scales has shape {tuple(scales.shape)} for {in_features} inputs, "
                                    f"{out_features} outputs and group_size {size}")  # fmt: skip
        zeros = unpack_columns(weights.get(f"{prefix}.qzeros", (groups, out_features // 8)), out_features)
        codes = _codes(weights, f"{prefix}.qweight", (in_features, out_features // 8), rows, cols)  # [in, out]
        g_idx = torch.arange(in_features, device=codes.device) // size
        scales, zeros, g_idx = shard_groups(scales, zeros, g_idx, rows, cols, prefix)
        return grouped_from_affine(codes.t(), 4, scales.t(), zeros.t(), g_idx, prefix)


def _codes(
    weights: Weights, name: str, shape: tuple[int, int], rows: tuple[Range, ...] | None, cols: Range | None
) -> torch.Tensor:
    """The codes [in, out] of the packed qweight [in, out/8]: only the words holding a rank's slice read."""
    if cols is not None:  # input rows are not packed
        return unpack_columns(weights.get_ranges(name, 0, (cols,), shape), shape[1] * 8)
    if rows is None:
        return unpack_columns(weights.get(name, shape), shape[1] * 8)
    words = tuple((start // 8, -(-(start + size) // 8) - start // 8) for start, size in rows)
    codes = unpack_columns(weights.get_ranges(name, 1, words, shape), 8 * sum(n for _, n in words))
    local, base = [], 0  # where each range sits among the unpacked words' outputs
    for (start, size), (word, count) in zip(rows, words, strict=True):
        local.append((base + start - 8 * word, size))
        base += 8 * count
    return take_ranges(codes, 1, tuple(local))
