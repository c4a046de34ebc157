"""The CPU RMSNorm and rotary kernels (layers/csrc/norm_rotary.cpp) against the torch code they replace
(`RMSNorm`, `apply_rotary` with the kernels off) and against float64: decode and prompt row counts,
rows strided inside a fused qkv output, partial and interleaved rotary dims, Gemma's weight offset,
other dtypes and the switch. Every model test runs through them too, since they are the default."""

from __future__ import annotations

import pytest
import torch

from lorax_server.layers import fused_cpu
from lorax_server.layers.norm import RMSNorm
from lorax_server.layers.rotary import apply_rotary

pytestmark = pytest.mark.skipif(fused_cpu.EXTENSION.ops() is None, reason="the CPU kernels did not build")


def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_cpu, "kernel_applies", lambda *tensors: False)


def cos_sin(tokens: int, rot_dim: int, interleaved: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    freqs = torch.arange(tokens).float().unsqueeze(-1) * torch.rand(rot_dim // 2, generator=g)
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma offset"])
def test_rms_norm_matches_the_torch_path(tokens: int, offset: float, monkeypatch: pytest.MonkeyPatch):
    g = torch.Generator().manual_seed(tokens)
    wide = torch.randn(tokens, 96, generator=g) * 3
    x = wide[:, 8:72]  # rows 96 apart
    norm = RMSNorm(torch.randn(64, generator=g), 1e-5, weight_offset=offset)
    fast = norm(x)
    x64 = x.double()
    exact = norm.weight.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-5)
    torch_path(monkeypatch)
    torch.testing.assert_close(fast, norm(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_of_three_dimensions_keeps_the_shape():
    x = torch.randn(5, 4, 16)
    norm = RMSNorm(torch.randn(16), 1e-6)
    out = norm(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[2], norm(x[2]))


@pytest.mark.parametrize("tokens", [1, 9, 130])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("rot_dim", [32, 16], ids=["full", "partial"])
def test_rotary_matches_the_torch_path(tokens: int, interleaved: bool, rot_dim: int, monkeypatch):
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, 3 * 4 * 32, generator=g)
    q = qkv[:, : 4 * 32].view(tokens, 4, 32)  # a view inside the fused output: rows 384 apart
    cos, sin = cos_sin(tokens, rot_dim, interleaved, seed=tokens)
    fast = apply_rotary(q, cos, sin, interleaved)
    assert fast.is_contiguous()
    torch_path(monkeypatch)
    reference = apply_rotary(q, cos, sin, interleaved)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast[..., rot_dim:], q[..., rot_dim:])  # the dims past rot_dim are copied


def test_other_dtypes_and_the_switch_take_the_torch_path(monkeypatch: pytest.MonkeyPatch):
    calls = []
    ops = fused_cpu.EXTENSION.ops()
    monkeypatch.setattr(fused_cpu.EXTENSION, "ops", lambda: calls.append(1) or ops)
    norm = RMSNorm(torch.randn(16).bfloat16(), 1e-6)
    assert norm(torch.randn(3, 16).bfloat16()).dtype == torch.bfloat16
    cos, sin = cos_sin(3, 8, False, seed=0)
    assert apply_rotary(torch.randn(3, 2, 8).bfloat16(), cos, sin).dtype == torch.bfloat16
    assert not fused_cpu.kernel_applies(torch.randn(16, 3).t())  # last dimension strided
    assert not fused_cpu.rotary_applies(torch.randn(3, 2, 8), cos[:1].expand(3, 8), sin)  # one row for all tokens
    assert not calls  # outside the kernels' domain they are not even looked up
    monkeypatch.undo()

    monkeypatch.setenv("LORAX_CPU_KERNELS", "0")
    monkeypatch.setattr(fused_cpu.EXTENSION, "_attempted", False)
    monkeypatch.setattr(fused_cpu.EXTENSION, "_ops", None)
    assert not fused_cpu.kernel_applies(torch.randn(3, 16))
    x = torch.randn(3, 16)
    norm = RMSNorm(torch.randn(16), 1e-6)
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), norm.weight * x32)


def test_bad_shapes_are_refused():
    ops = fused_cpu.EXTENSION.ops()
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.randn(3, 16), torch.randn(8), 1e-6)
    cos, sin = cos_sin(3, 8, False, seed=0)
    with pytest.raises(RuntimeError, match="cos, sin"):
        ops.rotary(torch.randn(4, 2, 8), cos, sin, False)
    with pytest.raises(RuntimeError, match="at most head_dim"):
        ops.rotary(torch.randn(3, 2, 4), cos, sin, False)
