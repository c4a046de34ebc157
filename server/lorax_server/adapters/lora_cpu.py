"""Segmented LoRA for float32 CPU tensors in one call per linear: the C++ kernel in `csrc/lora_sgmv.cpp`
(built by `utils.cpu_extension`).

`lora.LoraSlots.add_to` calls it when it applies, over the same kept stack the Triton kernels read;
the grid plan and the segment loop stay the reference it is tested against, and run instead where it
does not apply (other devices and dtypes, a failed build, `LORAX_CPU_KERNELS=0`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..utils.cpu_extension import CpuExtension

EXTENSION = CpuExtension(
    "lorax_lora",
    Path(__file__).resolve().parent / "csrc" / "lora_sgmv.cpp",
    "lorax_lora",
    "CPU LoRA kernel",
)


def kernel_applies(y: torch.Tensor, x: torch.Tensor) -> bool:
    """The kernel's domain (float32 on the CPU, rows with contiguous columns), and it is built."""
    return (
        y.is_cpu
        and y.dtype == torch.float32
        and x.dtype == torch.float32
        and y.stride(1) == 1
        and x.stride(1) == 1
        and EXTENSION.ops() is not None
    )


def sgmv_(
    y: torch.Tensor,  # [tokens, out_features], updated in place
    x: torch.Tensor,  # [tokens, in_features]
    a: torch.Tensor,  # [slots, in_features, ranks]: every part's A, transposed
    seg_start: torch.Tensor,  # [segments] int32
    seg_end: torch.Tensor,  # [segments] int32
    seg_slot: torch.Tensor,  # [segments] int32, -1: nothing to add
    runs: Sequence[tuple[int, int, torch.Tensor]],  # (out_start, r_start, b [slots, parts, rank, width])
) -> None:
    """y[s:e, out_start + p·width : …] += (x[s:e] @ a[slot])[:, r_start + p·rank : …] @ b[slot, p] for every
    segment, run and part p. Requires `kernel_applies(y, x)`."""
    EXTENSION.ops().sgmv_(
        y,
        x,
        a,
        seg_start,
        seg_end,
        seg_slot,
        [b for _, _, b in runs],
        [out_start for out_start, _, _ in runs],
        [r_start for _, r_start, _ in runs],
    )
