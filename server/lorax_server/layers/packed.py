"""Dense float32 linear weights reordered once into oneDNN's blocked layout, for CPU matmuls.

PyTorch's CPU `F.linear` goes through MKL's sgemm, which on some processors (AMD's among them) runs a
generic code path: on the 2-core AMD EPYC (AVX-512) development machine it reaches 75-85 GFLOP/s at
8 rows and 140-170 at 32-64 rows on this project's shapes, where oneDNN, given the weight in its own
blocked layout, reaches 110-180 and 180-220 (bench/RESULTS.md, session 15). The reorder happens once
at load; the packed copy replaces the dense tensor, so it costs no memory. Results differ from MKL's
only in float rounding (summation order), as between any two BLAS.

A `PackedWeight` is a `layers.quant.WeightFormat`: `Linear` calls `matmul` on it as on a quantized
weight, and `dequantize` gives the dense tensor back bit for bit. Off with LORAX_PACKED_WEIGHTS=0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)


class PackedWeight:
    """A [out_features, in_features] float32 weight in oneDNN's layout (an opaque mkldnn tensor)."""

    def __init__(self, dense: torch.Tensor) -> None:
        self.out_features, self.in_features = dense.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(dense.contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, in_features] → [num_tokens, out_features]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def dequantize(self) -> torch.Tensor:
        return self.packed.to_dense()

    def nbytes(self) -> int:
        return self.out_features * self.in_features * 4


def packing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model's dense weights are packed: float32 on a CPU whose PyTorch has oneDNN, unless
    LORAX_PACKED_WEIGHTS=0."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and os.environ.get("LORAX_PACKED_WEIGHTS", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and _packs_exactly()
    )


def pack_dense_weights(linears: Iterable, keep: Iterable[torch.Tensor] = ()) -> int:
    """Replace each `Linear`'s dense 2-D float32 weight by a `PackedWeight`; return how many were packed.
    Weights in `keep` stay dense: a tied LM head shares its tensor with the embedding lookup, and a packed
    copy would double that memory."""
    kept = {id(t) for t in keep}
    packed = 0
    for linear in linears:
        w = linear.weight
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype == torch.float32 and id(w) not in kept:
            linear.weight = PackedWeight(w)
            packed += 1
    return packed


# oneDNN makes a primitive per shape, the number of rows included, and caches it: the first step at a new
# row count paid 2-14 ms more in the engine (bench/RESULTS.md, session 25). Row counts up to this (every
# decode batch of up to 64 requests, prompts as short) are made at warm-up instead.
WARM_ROWS = 64


def make_primitives(linears: Iterable, max_rows: int = WARM_ROWS) -> int:
    """Multiply once by each distinct shape of packed weight at every row count from 1 to `max_rows`, so
    that oneDNN makes and caches those primitives now rather than in a step; returns how many shapes.
    oneDNN keys its primitives by shapes, not by weights, so one weight a shape serves them all."""
    shapes: dict[tuple[int, int], PackedWeight] = {}
    for linear in linears:
        w = linear.weight
        if isinstance(w, PackedWeight):
            shapes.setdefault((w.out_features, w.in_features), w)
    for w in shapes.values():
        x = torch.zeros(max_rows, w.in_features)
        for rows in range(1, max_rows + 1):
            w.matmul(x[:rows])
    return len(shapes)


_probe: bool | None = None


def _packs_exactly() -> bool:
    """Probe once that this build reorders and multiplies (some builds lack the ops or the ISA)."""
    global _probe
    if _probe is None:
        try:
            w, x = torch.randn(24, 40), torch.randn(5, 40)
            weight = PackedWeight(w)
            _probe = torch.equal(weight.dequantize(), w) and torch.allclose(
                weight.matmul(x), x @ w.t(), rtol=1e-4, atol=1e-4
            )
        except (RuntimeError, AttributeError) as err:
            logger.info("oneDNN packed weights unavailable (%s): dense float32 matmuls use torch's BLAS", err)
            _probe = False
    return _probe
