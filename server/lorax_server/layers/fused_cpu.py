"""RMSNorm and rotary embeddings for float32 CPU tensors in one pass each: the C++ kernels in
`csrc/norm_rotary.cpp` (built by `utils.cpu_extension`).

`layers.norm.RMSNorm` and `layers.rotary.apply_rotary` call them when they apply; their own torch code
is the reference the kernels are tested against, and runs instead anywhere else (other devices and
dtypes, a failed build, `LORAX_CPU_KERNELS=0`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils.cpu_extension import CpuExtension

EXTENSION = CpuExtension(
    "lorax_norm_rotary",
    Path(__file__).resolve().parent / "csrc" / "norm_rotary.cpp",
    "lorax_fused",
    "CPU RMSNorm and rotary kernels",
)


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """The kernels' domain (float32 CPU tensors whose last dimension is contiguous), and they are built."""
    return (
        all(t.is_cpu and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)
        and EXTENSION.ops() is not None
    )


def rotary_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """`kernel_applies`, with the shapes the rotary kernel takes (one cos and sin row per token)."""
    return (
        x.dim() == 3
        and cos.dim() == 2
        and cos.shape == sin.shape
        and cos.shape[0] == x.shape[0]
        and cos.stride() == sin.stride()
        and kernel_applies(x, cos, sin)
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x²) + eps) over the last dimension. Requires `kernel_applies(x, weight)`."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return EXTENSION.ops().rms_norm(rows, weight, eps).view(x.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """`layers.rotary.apply_rotary` (x [tokens, heads, head_dim]; cos, sin [tokens, rot_dim]) into a new
    contiguous tensor. Requires `rotary_applies(x, cos, sin)`."""
    return EXTENSION.ops().rotary(x, cos, sin, interleaved)
