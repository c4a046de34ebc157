"""`fp8` (and the weights of `fp8-kv`): float8_e4m3fn weights with one float32 scale per output
channel. From a full-precision checkpoint the scale is max |w| / 448 (e4m3's largest finite value);
an FP8 checkpoint (float8 `weight` with `weight_scale`, per tensor or per channel) loads as stored.
"""

from __future__ import annotations

import torch

from ...utils.weights import Weights
from ..parallel import Range
from . import QuantizationError
from .affine import input_groups, take_ranges
from .grouped import GroupedWeight

E4M3_MAX = 448.0
# Every byte read as a float8_e4m3fn value (the two NaN encodings included: they never occur in codes).
E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def from_fp8(values: torch.Tensor, scale: torch.Tensor) -> GroupedWeight:
    """values: float8_e4m3fn [out, in]; scale: a scalar or one per output channel."""
    out_features, in_features = values.shape
    scales = scale.float().reshape(-1, 1).expand(out_features, 1) if scale.numel() == 1 else scale.float()
    if scales.numel() != out_features:
        raise ValueError(f"weight_scale has {scale.numel()} values for {out_features} output channels")
    codes = values.view(torch.uint8)
    table = E4M3_VALUES.to(values.device)
    return GroupedWeight.from_codes(codes, 8, table, scales.reshape(out_features, 1), None, in_features)


def quantize_fp8(weight: torch.Tensor) -> GroupedWeight:
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return from_fp8((w / scale[:, None]).to(torch.float8_e4m3fn), scale)


class Fp8Checkpoint:
    """An FP8 checkpoint: float8_e4m3fn `weight` with `weight_scale` (one per tensor or per output
    channel, as compressed-tensors and most FP8 exports store it) or `weight_scale_inv` over
    [block_rows, block_cols] tiles (transformers' fine-grained FP8). Modules stored in higher precision
    stay dense.

    Under tensor parallelism a rank reads its output rows (any ranges: scales are per row, or tiles
    looked up row by row) or its input columns, which with block-wise scales must keep whole blocks
    (the rule of `affine.input_groups`)."""

    method = "fp8"

    def __init__(self, block: tuple[int, int] | None = None) -> None:
        self.block = block

    def load(
        self,
        weights: Weights,
        prefix: str,
        shape: tuple[int, int] | None,
        required: bool,
        rows: tuple[Range, ...] | None = None,
        cols: Range | None = None,
    ) -> GroupedWeight | None:
        """The module's weight, or this rank's output `rows` or input `cols` of it."""
        name = f"{prefix}.weight"
        if not weights.has(name) or weights.dtype_of(name) != "F8_E4M3":
            return None
        full = tuple(weights.shape(name))
        if rows is not None:
            values = weights.get_ranges(name, 0, rows, shape)
        elif cols is not None:
            values = weights.get_ranges(name, 1, (cols,), shape)
        else:
            values = weights.get(name, shape)
        if weights.has(f"{prefix}.weight_scale"):
            scale = weights.get(f"{prefix}.weight_scale").float()
            if rows is not None and scale.numel() > 1:  # one per output channel
                scale = take_ranges(scale.reshape(-1), 0, rows)
            return from_fp8(values, scale)
        if not weights.has(f"{prefix}.weight_scale_inv") or self.block is None:
            raise QuantizationError(f"{name} is float8 but {prefix}.weight_scale is missing")
        return self._blockwise(weights, prefix, values, full, rows, cols)

    def _blockwise(
        self,
        weights: Weights,
        prefix: str,
        values: torch.Tensor,  # float8 [out, in], a rank's slice of the whole `full`
        full: tuple[int, ...],
        rows: tuple[Range, ...] | None,
        cols: Range | None,
    ) -> GroupedWeight:
        tiles = weights.get(f"{prefix}.weight_scale_inv").float()  # [ceil(out / rows), ceil(in / cols)]
        block_rows, block_cols = self.block
        out_features, in_features = full
        if tuple(tiles.shape) != (-(-out_features // block_rows), -(-in_features // block_cols)):
            raise QuantizationError(
                f"{prefix}.weight_scale_inv has shape {tuple(tiles.shape)} for {full} "
                f"in {block_rows}x{block_cols} blocks"
            )
        ranges = rows if rows is not None else ((0, out_features),)
        out_rows = torch.cat([torch.arange(start, start + size, device=tiles.device) for start, size in ranges])
        scales = tiles[out_rows // block_rows]  # [out, groups of `block_cols` inputs]
        group_size = block_cols
        if cols is not None:
            what = f"{prefix} ({block_rows}x{block_cols} blocks)"
            groups = input_groups(torch.arange(in_features, device=tiles.device) // block_cols, cols, "block", what)
            scales, group_size = scales[:, groups.used], groups.size
        table = E4M3_VALUES.to(values.device)
        return GroupedWeight.from_codes(values.view(torch.uint8), 8, table, scales, None, group_size)
