"""Matmul with lookup-table quantized weights: the one CPU kernel behind every low-bit format.

A weight W [N, K] is stored as
- `codes`: uint8 [N, K * bits / 8], `bits` in {2, 4, 8}, packed little-endian within a byte (element k
  at bit `(k % (8 // bits)) * bits` of byte `k // (8 // bits)`);
- `table`: float32 [2**bits], the value of each code (`arange(16)` for GPTQ/AWQ, a codebook for nf4/fp4,
  the 256 float8 values for fp8);
- `scales`: float32 [N, K / group_size] and `offsets`: float32 [N, K / group_size] or None,

and means `W[n, k] = table[code] * scales[n, k // group_size] + offsets[n, k // group_size]`.

`lut_matmul` runs the C++ extension in `csrc/lut_matmul.cpp` on CPU tensors (built on first use with
`torch.utils.cpp_extension`, or ahead of time with `python -m lorax_server.layers.quant.lut --build`);
anywhere else, when the build fails, or with `LORAX_CPU_KERNELS=0`, it runs the torch reference
(`lut_dequantize` then a matmul), which is also the oracle the kernel is tested against.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent / "csrc" / "lut_matmul.cpp"
_NAME = "lorax_lut_matmul"
BITS = (2, 4, 8)

_op: Callable[..., torch.Tensor] | None = None
_load_attempted = False
_load_lock = threading.Lock()


def kernels_enabled() -> bool:
    """False when `LORAX_CPU_KERNELS=0` asks for the torch reference path."""
    return os.environ.get("LORAX_CPU_KERNELS", "1") != "0"


def build_directory() -> Path:
    """Where the extension is built: `$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), one
    folder per torch and Python version so that environments never load each other's binaries."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"{_NAME}-{py}-torch{torch.__version__.replace('+', '_')}"


def _build(verbose: bool = False) -> str:
    """Compiles (or reuses a cached build of) the extension and loads it into the process; returns
    the library's path and raises when the compiler fails. cpp_extension holds a file lock over
    the build, so processes starting together build once and the others wait."""
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    # The AVX2 functions carry target attributes and are picked at run time: -march=native would
    # tie the binary to the build machine. at::parallel_for is inline OpenMP code in torch's headers:
    # without -fopenmp it silently runs on one thread (the loader then shares torch's libgomp).
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    return load(
        name=_NAME,
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-fno-math-errno", *openmp],
        extra_ldflags=openmp,
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )


def _kernel() -> Callable[..., torch.Tensor] | None:
    """The extension's op, loaded once per process; None when disabled or the build failed."""
    global _op, _load_attempted
    with _load_lock:  # threads arriving during the first build wait for it
        if not _load_attempted:
            if kernels_enabled():
                try:
                    _build()
                    _op = torch.ops.lorax_quant.lut_matmul
                except Exception as exc:  # any compiler or loader failure means: use the torch path
                    logger.warning("CPU low-bit kernel unavailable, using the torch reference path: %s", exc)
            _load_attempted = True
    return _op


def kernel_available() -> bool:
    """Whether `lut_matmul` runs the C++ kernel for CPU tensors (builds it on first call)."""
    return _kernel() is not None


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] with values < 2**bits → packed uint8 [N, K * bits / 8]."""
    per_byte = 8 // bits
    if bits not in BITS or codes.shape[-1] % per_byte:
        raise ValueError(f"cannot pack {codes.shape[-1]} values of {bits} bits into whole bytes")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        packed |= c[..., i] << (i * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed uint8 [N, K * bits / 8] → uint8 codes [N, K]; the inverse of `pack_codes`."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def lut_dequantize(
    codes: torch.Tensor,
    bits: int,
    table: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The weight as float32 [N, in_features]: `table[code] * scale + offset` per group (reference)."""
    idx = unpack_codes(codes, bits)[:, :in_features].long()  # [N, K]
    n = idx.shape[0]
    values = torch.gather(table.float().expand(n, -1), 1, idx)  # 4x faster than table[idx] on CPU
    grouped = values.view(n, -1, group_size) * scales.float().view(n, -1, 1)
    if offsets is not None:
        grouped = grouped + offsets.float().view(n, -1, 1)
    return grouped.view(n, in_features)


def lut_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    bits: int,
    table: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """x [..., K] @ W.T → [..., N] in x's dtype, W given by codes/table/scales/offsets (see module doc)."""
    op = _op if _load_attempted else _kernel()
    if op is None or not x.is_cpu:
        w = lut_dequantize(codes, bits, table, scales, offsets, group_size, x.shape[-1])
        return (x.float() @ w.t()).to(x.dtype)
    return op(x, codes, bits, table, scales, offsets, group_size)  # converts to float32 and back itself


def main(argv: list[str]) -> int:
    if argv != ["--build"]:
        print("usage: python -m lorax_server.layers.quant.lut --build", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        path = _build()
    except Exception as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
