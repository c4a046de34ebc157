"""Segmented LoRA for float32 CPU tensors in one call per linear: the C++ kernel in `csrc/lora_sgmv.cpp`
(built by `utils.cpu_extension`).

`lora.LoraSlots.add_to` calls it when it applies, over the same kept stack the Triton kernels read;
the grid plan and the segment loop stay the reference it is tested against, and run instead where it
does not apply (other devices and dtypes, a failed build, `LORAX_CPU_KERNELS=0`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


TILE = 32  # columns of B the kernel's expand reads at a time


def tile_columns(b: torch.Tensor) -> None:
    """Lay out every [rank, width] matrix of `b` ([..., rank, width], contiguous) in column tiles, in place,
    as the kernel reads them: the tiles of TILE columns, each [rank, TILE] row-major, then the last
    width % TILE columns as [rank, width % TILE]. The tensor keeps its shape; only the kernel reads it."""
    *lead, rank, width = b.shape
    full = width // TILE * TILE
    tiles = b[..., :full].reshape(*lead, rank, full // TILE, TILE).transpose(-3, -2).reshape(*lead, rank * full)
    rest = b[..., full:].reshape(*lead, rank * (width - full))
    flat = b.view(*lead, rank * width)
    flat.copy_(torch.cat([tiles, rest], dim=-1))


@dataclass(frozen=True)
class KernelRuns:
    """A stack's expand runs as the kernel takes them: each run's B ([slots, parts, rank, width], tiled by
    `tile_columns`), its first output column and its first rank in the stack's A."""

    b: list[torch.Tensor]
    out_start: list[int]
    r_start: list[int]

    @classmethod
    def of(cls, runs: Sequence[tuple[int, int, torch.Tensor]]) -> KernelRuns:
        """From (out_start, r_start, b) per run."""
        return cls([b for _, _, b in runs], [o for o, _, _ in runs], [r for _, r, _ in runs])


def sgmv_(
    y: torch.Tensor,  # [tokens, out_features], updated in place
    x: torch.Tensor,  # [tokens, in_features]
    a: torch.Tensor,  # [slots, in_features, ranks]: every part's A, transposed
    seg_start: torch.Tensor,  # [segments] int32
    seg_end: torch.Tensor,  # [segments] int32
    seg_slot: torch.Tensor,  # [segments] int32, -1: nothing to add
    runs: KernelRuns,
    scale: torch.Tensor | None = None,  # [slots, ranks] float32: None when each B holds its scale
) -> None:
    """y[s:e, out_start + p·width : …] += (x[s:e] @ a[slot] · scale[slot])[:, r_start + p·rank : …] @ b[slot, p]
    for every segment, run and part p. The factors (a and every b) are float32, bfloat16 or float16, all of
    one dtype; 16-bit factors are widened as they are read. Requires `kernel_applies(y, x)`."""
    EXTENSION.ops().sgmv_(y, x, a, seg_start, seg_end, seg_slot, runs.b, runs.out_start, runs.r_start, scale)
