"""`gptq`: pre-quantized GPTQ checkpoints (AutoGPTQ / optimum / GPTQModel layout).

Per linear module: `qweight` int32 [in·bits/32, out] (codes packed along the input dimension),
`qzeros` int32 [groups, out·bits/32] (packed along the output dimension), `scales` [groups, out] and
optionally `g_idx` int32 [in] (the group of each input channel; act-order checkpoints permute it).
W[n, k] = scales[g, n] · (q[k, n] − zero[g, n]) with g = g_idx[k]. The "gptq" checkpoint format stores
zero − 1 (a historical quirk), "gptq_v2" stores the zero itself. Bits 2, 3, 4 and 8; any group size,
-1 meaning one group over all input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...utils.weights import Weights
from ..parallel import Range, ShardingError
from . import QuantizationError, stored_shape
from .grouped import GroupedWeight
from .packed import unpack_stream

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GptqCheckpoint:
    bits: int | None = None  # None: read from each module's shapes
    group_size: int | None = None
    zeros_minus_one: bool = True  # checkpoint_format "gptq" (v1)
    method: str = "gptq"
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
        if rows is not None or cols is not None:
            raise ShardingError(f"{prefix}: GPTQ checkpoints cannot be sharded yet; serve them with one shard")
        shape = stored_shape(self.method, weights.has, prefix, shape, required, self.dense_modules)
        if shape is None:
            return None
        out_features, in_features = shape
        qweight = weights.get(f"{prefix}.qweight")
        bits = self._bits(prefix, qweight.shape, in_features)
        if qweight.shape[1] != out_features:
            raise QuantizationError(f"{prefix}.qweight has shape {tuple(qweight.shape)} for a [{in_features} → "
                                    f"{out_features}] linear")  # fmt: skip
        scales = weights.get(f"{prefix}.scales").float()  # [groups, out]
        groups = scales.shape[0]
        g_idx = self._group_index(weights, prefix, in_features, groups)
        codes = unpack_stream(qweight, bits, in_features)  # [in, out]
        zeros = unpack_stream(weights.get(f"{prefix}.qzeros").t(), bits, out_features).t()  # [groups, out]
        if self.zeros_minus_one:
            zeros = (zeros + 1) & (2**bits - 1)
        return grouped_from_affine(codes.t(), bits, scales.t(), zeros.t(), g_idx, f"{prefix}.g_idx")

    def _bits(self, prefix: str, shape: torch.Size, in_features: int) -> int:
        packed_rows = shape[0]
        bits = self.bits or packed_rows * 32 // in_features
        if bits not in BITS:
            raise QuantizationError(f"GPTQ with {bits} bits is not supported (supported: 2, 3, 4, 8)")
        if packed_rows != -(-in_features * bits // 32):
            raise QuantizationError(
                f"{prefix}.qweight has {packed_rows} rows, but {in_features} inputs at {bits} bits pack into "
                f"{-(-in_features * bits // 32)}"
            )
        return bits

    def _group_index(self, weights: Weights, prefix: str, in_features: int, groups: int) -> torch.Tensor:
        if weights.has(f"{prefix}.g_idx"):
            g_idx = weights.get(f"{prefix}.g_idx", (in_features,)).to(torch.int64)
        else:
            size = in_features if self.group_size in (None, -1) and groups == 1 else self.group_size
            if not size or -(-in_features // size) != groups:
                raise QuantizationError(f"{prefix}.scales has {groups} groups for {in_features} inputs and "
                                        f"group_size {self.group_size}")  # fmt: skip
            g_idx = torch.arange(in_features, device=weights.device) // size
        if g_idx.min() < 0 or g_idx.max() >= groups:
            raise QuantizationError(f"{prefix}.g_idx names groups outside the {groups} of {prefix}.scales")
        return g_idx


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
