"""`gptq`: pre-quantized GPTQ checkpoints (AutoGPTQ / optimum / GPTQModel layout).

Per linear module: `qweight` int32 [in·bits/32, out] (codes packed along the input dimension),
`qzeros` int32 [groups, out·bits/32] (packed along the output dimension), `scales` [groups, out] and
optionally `g_idx` int32 [in] (the group of each input channel; act-order checkpoints permute it).
W[n, k] = scales[g, n] · (q[k, n] − zero[g, n]) with g = g_idx[k]. The "gptq" checkpoint format stores
zero − 1 (a historical quirk), "gptq_v2" stores the zero itself. Bits 2, 3, 4 and 8; any group size,
-1 meaning one group over all input channels.

Under tensor parallelism a rank reads only the qweight words that hold its slice of W (output rows or
input columns); which input slices keep exact groups (act-order ones mostly do not) is said in `affine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...utils.weights import Weights
from ..parallel import Range
from . import QuantizationError, stored_shape
from .affine import grouped_from_affine, shard_groups
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
        """The module's weight, or this rank's output `rows` or input `cols` of it (see `affine`)."""
        shape = stored_shape(self.method, weights.has, prefix, shape, required, self.dense_modules)
        if shape is None:
            return None
        out_features, in_features = shape
        bits = self._bits(prefix, weights.shape(f"{prefix}.qweight"), in_features, out_features)
        scales = weights.get(f"{prefix}.scales").float()  # [groups, out]
        g_idx = self._group_index(weights, prefix, in_features, scales.shape[0])
        zeros = unpack_stream(weights.get(f"{prefix}.qzeros").t(), bits, out_features).t()  # [groups, out]
        if self.zeros_minus_one:
            zeros = (zeros + 1) & (2**bits - 1)
        codes = self._codes(weights, f"{prefix}.qweight", bits, in_features, rows, cols)  # [in, out], sliced
        scales, zeros, g_idx = shard_groups(scales, zeros, g_idx, rows, cols, prefix)
        return grouped_from_affine(codes.t(), bits, scales.t(), zeros.t(), g_idx, f"{prefix}.g_idx")

    @staticmethod
    def _codes(
        weights: Weights, name: str, bits: int, in_features: int, rows: tuple[Range, ...] | None, cols: Range | None
    ) -> torch.Tensor:
        """The codes [in, out] of the packed qweight, only the words that hold a rank's slice read."""
        if rows is not None:  # each output column is its own stream
            return unpack_stream(weights.get_ranges(name, 1, rows), bits, in_features)
        if cols is None:
            return unpack_stream(weights.get(name), bits, in_features)
        start, size = cols
        first = start - start % 32  # 32 values fill whole words at any width (3-bit values straddle words)
        last = min(-(-(start + size) // 32) * 32, in_features)
        first_word = first * bits // 32
        words = weights.get_ranges(name, 0, ((first_word, -(-last * bits // 32) - first_word),))
        return unpack_stream(words, bits, last - first)[start - first : start - first + size]

    def _bits(self, prefix: str, shape: list[int], in_features: int, out_features: int) -> int:
        packed_rows = shape[0]
        bits = self.bits or packed_rows * 32 // in_features
        if bits not in BITS:
            raise QuantizationError(f"GPTQ with {bits} bits is not supported (supported: 2, 3, 4, 8)")
        if packed_rows != -(-in_features * bits // 32):
            raise QuantizationError(
                f"{prefix}.qweight has {packed_rows} rows, but {in_features} inputs at {bits} bits pack into "
                f"{-(-in_features * bits // 32)}"
            )
        if shape[1] != out_features:
            raise QuantizationError(f"{prefix}.qweight has shape {tuple(shape)} for a [{in_features} → "
                                    f"{out_features}] linear")  # fmt: skip
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
