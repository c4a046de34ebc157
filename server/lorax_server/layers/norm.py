"""Normalisation layers, computed in float32 like the reference implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.weights import Weights
from . import fused_cpu


class RMSNorm:
    """`w * x / rms(x)`; `weight_offset=1` gives Gemma's `(1 + w)` form."""

    def __init__(self, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> None:
        self.weight = weight + weight_offset if weight_offset else weight  # [hidden]
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden]."""
        if fused_cpu.kernel_applies(x, self.weight):
            return fused_cpu.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float, hidden: int, weight_offset: float = 0.0) -> RMSNorm:
        return cls(weights.get(f"{prefix}.weight", (hidden,)), eps, weight_offset)


class LayerNorm:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> None:
        self.weight = weight  # [hidden]
        self.bias = bias  # [hidden] or None
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float, hidden: int, bias: bool = True) -> LayerNorm:
        b = weights.get(f"{prefix}.bias", (hidden,)) if bias else None
        return cls(weights.get(f"{prefix}.weight", (hidden,)), b, eps)


class HeadLayerNorm:
    """Bias-free LayerNorm over the last dim with a weight per (head, dim): Cohere's q/k norm."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight  # [heads, head_dim]
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, heads, head_dim]."""
        x32 = x.float()
        centered = x32 - x32.mean(-1, keepdim=True)
        x32 = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)
