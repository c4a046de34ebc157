"""The one linear abstraction: a (possibly fused, possibly sharded) weight with an optional bias.

Fused projections (q|k|v, gate|up) are one matmul; `out_splits` remembers the parts so callers (and
LoRA wrappers) can address each part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.weights import Weights


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_splits: list[int]) -> None:
        self.weight = weight  # [out_features, in_features]
        self.bias = bias  # [out_features] or None
        self.out_splits = out_splits  # sizes of the fused parts along out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, in_features] → [num_tokens, out_features]."""
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def load(
        cls,
        weights: Weights,
        prefixes: list[str],
        bias: bool,
        shapes: list[tuple[int, int]] | None = None,
        transposed: bool = False,
    ) -> Linear:
        """Load and fuse `prefix.weight` (+ `prefix.bias`) for each prefix along the output dim.

        `shapes` gives each part's expected [out, in]; `transposed` reads Conv1D-style [in, out] tensors.
        """
        parts, biases = [], []
        for i, prefix in enumerate(prefixes):
            expect = None
            if shapes is not None:
                expect = shapes[i][::-1] if transposed else shapes[i]
            w = weights.get(f"{prefix}.weight", expect)
            parts.append(w.t().contiguous() if transposed else w)
            if bias:
                biases.append(weights.get(f"{prefix}.bias", (parts[-1].shape[0],)))
        weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        fused_bias = None
        if bias:
            fused_bias = biases[0] if len(biases) == 1 else torch.cat(biases, dim=0)
        return cls(weight, fused_bias, [p.shape[0] for p in parts])
