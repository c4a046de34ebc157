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
    [Path(__file__).resolve().parent / "csrc" / name for name in ("lora_sgmv.cpp", "lora_slots.cpp")],
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


@dataclass(frozen=True)
class KernelRuns:
    """A stack's expand runs as the kernel takes them: each run's B ([slots, parts, rank, width], tiled by
    `write_slot_`), its first output column and its first rank in the stack's A."""

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


def write_slot_(
    a: torch.Tensor,  # [slots, in_features, ranks], written in place
    runs: KernelRuns,  # written in place
    scale: torch.Tensor | None,  # [slots, ranks] float32, written in place; None: each B holds its scale
    slot: int,
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, int, int, int, float]],
) -> None:
    """Write an adapter into `slot` of a kernel stack, whatever the slot held: for every part (A [rank, in],
    B [width, rank], its first rank in `a`, its run, its place in the run, its scale), A transposed into
    `a`, and B transposed (times the scale, or the scale into `scale`) into its run's B in column tiles
    of 32 (the columns the kernel's expand reads at a time): the tiles, each [rank of the stack, 32]
    row-major, then the last width % 32 columns as [rank of the stack, width % 32]; every other value of
    the slot zero. Factors are widened to the stack's dtype (16-bit factors into a float32 stack) or are
    of its dtype. One call a linear (`csrc/lora_slots.cpp`)."""
    EXTENSION.ops().write_slot_(
        a,
        runs.b,
        scale,
        slot,
        [p[0] for p in parts],
        [p[1] for p in parts],
        [p[2] for p in parts],
        [p[3] for p in parts],
        [p[4] for p in parts],
        [p[5] for p in parts],
    )
