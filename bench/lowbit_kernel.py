"""The CPU low-bit matmul kernel (layers/quant/lut.py) vs a dense float32 matmul, in one run.

For the benchmark model's linear shapes (N x K = 512x512, 1408x512, 512x1408), M rows of float32
activations and 4/8/2-bit weights, prints a markdown table of microseconds per call:
- dense: `x @ w.t()` with the float32 weight;
- kernel: `lut_matmul` (the C++ extension);
- ratio: kernel / dense;
- torch ref: `lut_dequantize` + matmul, the path the kernel replaces.
Weight kinds: `affine` (a table of consecutive integers, as GPTQ/AWQ/hqq/int8 store) and `codebook`
(a random 16- or 4-entry table like nf4/fp4; for 8 bits the float8_e4m3fn values). 2- and 4-bit
weights have a group of 128; 8-bit ones one scale per output channel. The three timings of a
row are interleaved over several rounds and the fastest round is kept, to be fair under noise.

    .venv/bin/python bench/lowbit_kernel.py [--threads 2] [--kinds affine,codebook]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

# numpy (imported by torch) starts OpenBLAS threads that only compete for the cores measured here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from lorax_server.layers.quant.lut import kernel_available, lut_dequantize, lut_matmul, pack_codes  # noqa: E402

SHAPES = ((512, 512), (1408, 512), (512, 1408))
MS = (1, 4, 16, 64)
BITS = (4, 8, 2)


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Mean time of one call over a batch lasting about `seconds`."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    reps = max(3, int(seconds / once))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def fastest(fns: list[Callable[[], object]], rounds: int, seconds: float) -> list[float]:
    """Best per-call time of each function, measured in alternation."""
    for fn in fns:  # warm-up
        for _ in range(3):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], per_call_us(fn, seconds))
    return best


def weight(
    n: int, k: int, bits: int, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(codes, table, scales, offsets, group_size) of a random [n, k] weight."""
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    if kind == "affine":
        table = torch.arange(2**bits, dtype=torch.float32)
    elif bits == 8:
        table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        codes[(codes & 0x7F) == 0x7F] -= 1  # no NaN codes
    else:
        table = torch.randn(2**bits).sort().values
    group = k if bits == 8 else 128
    scales = torch.rand(n, k // group) * 0.02
    offsets = -scales * 2 ** (bits - 1) if kind == "affine" else None
    return pack_codes(codes, bits), table, scales, offsets, group


def reference_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    bits: int,
    table: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group: int,
) -> torch.Tensor:
    """What a format did before the kernel: dequantize the whole weight, then a dense matmul."""
    return x @ lut_dequantize(codes, bits, table, scales, offsets, group, x.shape[-1]).t()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", default="affine,codebook")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.02, help="length of one timed batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not kernel_available():
        sys.exit("the C++ kernel did not build; see the warning above")

    print(f"threads: {args.threads}, torch {torch.__version__}, times in µs per call (best of {args.rounds})\n")
    print("| bits | kind | N x K | M | dense | kernel | ratio | torch ref |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for bits in BITS:
        for kind in args.kinds.split(","):
            for n, k in SHAPES:
                dense = torch.randn(n, k)
                codes, table, scales, offsets, group = weight(n, k, bits, kind)
                quantized = (codes, bits, table, scales, offsets, group)
                for m in MS:
                    x = torch.randn(m, k)
                    calls = [partial(torch.matmul, x, dense.t()), partial(lut_matmul, x, *quantized)]
                    calls.append(partial(reference_matmul, x, *quantized))
                    d, kern, ref = fastest(calls, args.rounds, args.seconds)
                    row = f"| {bits} | {kind} | {n}x{k} | {m} | {d:.1f} | {kern:.1f} | {kern / d:.2f} | {ref:.1f} |"
                    print(row, flush=True)


if __name__ == "__main__":
    main()
