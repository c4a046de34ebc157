"""Matmul with lookup-table quantized weights: the one CPU kernel behind every low-bit format.

A weight W [N, K] is stored as
- `codes`: uint8 [N, K * bits / 8], `bits` in {2, 4, 8}, packed little-endian within a byte (element k
  at bit `(k % (8 // bits)) * bits` of byte `k // (8 // bits)`);
- `table`: float32 [2**bits], the value of each code (`arange(16)` for GPTQ/AWQ, a codebook for nf4/fp4,
  the 256 float8 values for fp8);
- `scales`: float32 [N, K / group_size] and `offsets`: float32 [N, K / group_size] or None,

and means `W[n, k] = table[code] * scales[n, k // group_size] + offsets[n, k // group_size]`.

`lut_matmul` runs the C++ extension in `csrc/lut_matmul.cpp` on CPU tensors (built by
`utils.cpu_extension`); anywhere else, when the build fails, or with `LORAX_CPU_KERNELS=0`, it runs the
torch reference (`lut_dequantize` then a matmul), which is also the oracle the kernel is tested against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...utils.cpu_extension import CpuExtension

EXTENSION = CpuExtension(
    "lorax_lut_matmul", Path(__file__).resolve().parent / "csrc" / "lut_matmul.cpp", "lorax_quant", "CPU low-bit kernel"
)
BITS = (2, 4, 8)


def kernel_available() -> bool:
    """Whether `lut_matmul` runs the C++ kernel for CPU tensors (builds it on first call)."""
    return EXTENSION.ops() is not None


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
    ops = EXTENSION.ops()
    if ops is None or not x.is_cpu:
        w = lut_dequantize(codes, bits, table, scales, offsets, group_size, x.shape[-1])
        return (x.float() @ w.t()).to(x.dtype)
    return ops.lut_matmul(x, codes, bits, table, scales, offsets, group_size)  # converts to float32 and back itself
