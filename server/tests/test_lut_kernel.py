"""The CPU low-bit kernel (layers/quant/csrc/lut_matmul.cpp) against its torch reference (`lut_dequantize`)."""

from __future__ import annotations

import pytest
import torch

from lorax_server.layers.quant import lut

# Rows of x on both sides of the kernel's paths: direct decode (M <= 3), decoded tiles, BLAS (M > 128).
MS = (1, 3, 8, 33, 64, 129)


def make_weight(n: int, k: int, bits: int, group_size: int, offsets: bool, table: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    if table == "random":  # a codebook (nf4/fp4 style), negative values included
        values = torch.randn(2**bits, generator=g)
    elif table == "affine":  # GPTQ/AWQ/int8 style: the kernel decodes it arithmetically
        values = torch.arange(2**bits, dtype=torch.float32) - 2 ** (bits - 1)
    else:  # every float8_e4m3fn value, also decoded arithmetically
        values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        codes[codes == 0x7F] = 0x7E  # the NaN codes never occur in real weights
        codes[codes == 0xFF] = 0xFE
    scales = torch.rand(n, k // group_size, generator=g) + 0.1
    offs = torch.randn(n, k // group_size, generator=g) if offsets else None
    return lut.pack_codes(codes, bits), values, scales, offs


def check(x: torch.Tensor, weight, bits: int, group_size: int, rel: float) -> None:
    packed, table, scales, offsets = weight
    k = x.shape[-1]
    w = lut.lut_dequantize(packed, bits, table, scales, offsets, group_size, k)
    ref = x.double() @ w.double().t()
    y = lut.lut_matmul(x, packed, bits, table, scales, offsets, group_size)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    # Error relative to the size of the terms summed, not of the (possibly cancelling) result.
    magnitude = (x.double().abs() @ w.double().abs().t()).max().item()
    err = (y.double() - ref).abs().max().item()
    assert err <= rel * magnitude, f"max error {err:.3g} vs magnitude {magnitude:.3g}"


def test_kernel_is_built():
    # CI has g++ and ninja: a broken build must fail here, not fall back silently.
    assert lut.kernel_available()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("offsets", [True, False])
@pytest.mark.parametrize("group", ["channel", 64, 16])
def test_matches_reference(bits: int, offsets: bool, group):
    n, k = 37, 128  # N not a multiple of the tile or SIMD width
    group_size = k if group == "channel" else group
    tables = ["random", "affine"] + (["fp8"] if bits == 8 else [])
    for i, table in enumerate(tables):
        weight = make_weight(n, k, bits, group_size, offsets, table, seed=i)
        for m in MS:
            check(torch.randn(m, k), weight, bits, group_size, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [40, 20])
def test_odd_sizes_use_scalar_tails(bits: int, group_size: int):
    weight = make_weight(13, 40, bits, group_size, True, "random")
    for m in (1, 2, 3, 5, 200):
        check(torch.randn(m, 40), weight, bits, group_size, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_portable_path(bits: int):
    # The scalar code that runs on CPUs without AVX2+FMA (and off x86).
    assert lut.kernel_available()
    previous = torch.ops.lorax_quant.set_simd(False)
    try:
        for table in ("random", "affine") + (("fp8",) if bits == 8 else ()):
            weight = make_weight(13, 40, bits, 20, True, table)
            for m in (1, 5, 200):
                check(torch.randn(m, 40), weight, bits, 20, rel=1e-5)
    finally:
        torch.ops.lorax_quant.set_simd(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight = make_weight(301, 256, 4, 64, True, "random")
        for m in (1, 8, 64, 200):
            check(torch.randn(m, 256), weight, 4, 64, rel=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_and_leading_dims(bits: int):
    weight = make_weight(40, 64, bits, 32, True, "random")
    for m in (1, 7, 33):
        check(torch.randn(2, m, 64).to(torch.bfloat16), weight, bits, 32, rel=1e-2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits: int):
    codes = torch.randint(0, 2**bits, (5, 48), dtype=torch.uint8)
    packed = lut.pack_codes(codes, bits)
    assert packed.shape == (5, 48 * bits // 8)
    assert torch.equal(lut.unpack_codes(packed, bits), codes)


def test_packing_is_little_endian_within_a_byte():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert lut.pack_codes(codes[:, :2], 4).tolist() == [[0x21]]
    assert lut.pack_codes(codes, 2).tolist() == [[0b00111001]]


def test_env_switch_takes_reference_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORAX_CPU_KERNELS", "0")
    monkeypatch.setattr(lut.EXTENSION, "_attempted", False)
    monkeypatch.setattr(lut.EXTENSION, "_ops", None)
    assert not lut.kernel_available()
    weight = make_weight(9, 32, 4, 16, True, "random")
    check(torch.randn(3, 32), weight, 4, 16, rel=1e-5)
