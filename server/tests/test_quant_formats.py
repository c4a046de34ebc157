"""Each weight format's dequantization against an independent reading of the format: GPTQ and AWQ
checkpoints written by the tests' own packers from the public layouts, bitsandbytes' own quantize and
dequantize functions, torch's float8 casts, and the definitions of int8 and HQQ; plus the matmul of
every format against its dequantized weight, fusion of parts, and the errors for bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes.functional as bnb
import pytest
import torch
from quant_packers import awq_pack, gptq_pack
from safetensors.torch import save_file

from lorax_server.layers.quant import QuantizationError, checkpoint
from lorax_server.layers.quant.awq import AwqCheckpoint
from lorax_server.layers.quant.bnb4 import quantize_4bit
from lorax_server.layers.quant.fp8 import Fp8Checkpoint, quantize_fp8
from lorax_server.layers.quant.gptq import GptqCheckpoint
from lorax_server.layers.quant.grouped import GroupedWeight, StackedWeight, stack_parts
from lorax_server.layers.quant.hqq import quantize_hqq
from lorax_server.layers.quant.int8 import quantize_bnb_int8
from lorax_server.layers.quant.methods import quantizer
from lorax_server.utils.weights import Weights


def _weights(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Weights:
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return Weights(tmp_path, torch.float32, torch.device("cpu"))


def _check_matmul(weight, x_rows: int = 5) -> None:  # noqa: ANN001
    x = torch.randn(x_rows, weight.in_features)
    want = x.double() @ weight.dequantize().double().t()
    assert (weight.matmul(x).double() - want).abs().max() < 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("group_size", "act_order", "sym", "v2"), [
    (-1, False, True, False),
    (32, False, False, False),
    (16, True, False, False),
    (32, True, True, True),
    (24, False, False, False),  # 80 inputs: a partial last group
])  # fmt: skip
def test_gptq_reader_equals_the_packed_layout(
    tmp_path: Path, bits: int, group_size: int, act_order: bool, sym: bool, v2: bool
) -> None:
    w = torch.randn(48, 80 if group_size == 24 else 96)  # 80 inputs at 3 bits: a partly filled last word
    tensors, dequantized = gptq_pack(w, bits, group_size, act_order, sym, v2)
    weights = _weights(tmp_path, {f"m.{k}": v for k, v in tensors.items()})
    reader = GptqCheckpoint(bits, group_size, zeros_minus_one=not v2)
    q = reader.load(weights, "m", tuple(w.shape), required=True)
    assert torch.equal(q.dequantize(), dequantized)
    assert (q.perm is not None) == act_order
    _check_matmul(q)
    # Bits and group size are read from the shapes when the checkpoint does not state them.
    assert torch.equal(GptqCheckpoint(zeros_minus_one=not v2).load(weights, "m", tuple(w.shape), True).dequantize(),
                       dequantized)  # fmt: skip


@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_reader_equals_the_packed_layout(tmp_path: Path, group_size: int) -> None:
    w = torch.randn(40, 128)
    tensors, dequantized = awq_pack(w, group_size)
    weights = _weights(tmp_path, {f"m.{k}": v for k, v in tensors.items()})
    q = AwqCheckpoint(group_size).load(weights, "m", (40, 128), required=True)
    assert torch.equal(q.dequantize(), dequantized)
    _check_matmul(q)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_codebooks_equal_bitsandbytes(kind: str) -> None:
    w = torch.randn(32, 192) * torch.linspace(0.1, 4, 32)[:, None]
    ours = quantize_4bit(w, kind)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type=kind)
    theirs = bnb.dequantize_4bit(packed, state)
    assert torch.equal(ours.dequantize(), theirs)
    _check_matmul(ours)
    assert ours.nbytes() == 32 * 192 // 2 + 32 * 3 * 4  # half a byte per weight, a float32 absmax per 64


def test_int8_equals_bitsandbytes_vectorwise_quantization() -> None:
    w = torch.randn(24, 72)
    ours = quantize_bnb_int8(w)
    codes, absmax, _ = bnb.int8_vectorwise_quant(w)
    theirs = bnb.int8_vectorwise_dequant(codes, absmax)
    assert (ours.dequantize() - theirs).abs().max() <= 1e-6 * w.abs().max()
    _check_matmul(ours)


def test_fp8_equals_torch_float8_casts(tmp_path: Path) -> None:
    w = torch.randn(16, 64) * 3
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    want = (w / scale).to(torch.float8_e4m3fn).float() * scale
    ours = quantize_fp8(w)
    assert torch.equal(ours.dequantize(), want)
    _check_matmul(ours)
    # An FP8 checkpoint: per-channel and per-tensor weight_scale, and transformers' block-wise scales.
    values = (w / scale).to(torch.float8_e4m3fn)
    tiles = torch.rand(2, 2) + 0.5  # [16 / 8, 64 / 32] blocks of 8 x 32
    weights = _weights(tmp_path, {
        "a.weight": values, "a.weight_scale": scale,
        "b.weight": values.clone(), "b.weight_scale": torch.tensor(0.5),
        "c.weight": values.clone(), "c.weight_scale_inv": tiles,
        "d.weight": w,
    })  # fmt: skip
    reader = Fp8Checkpoint(block=(8, 32))
    assert torch.equal(reader.load(weights, "a", (16, 64), True).dequantize(), want)
    assert torch.equal(reader.load(weights, "b", (16, 64), True).dequantize(), values.float() * 0.5)
    block_scales = tiles.repeat_interleave(8, 0).repeat_interleave(32, 1)
    assert torch.equal(reader.load(weights, "c", (16, 64), True).dequantize(), values.float() * block_scales)
    assert reader.load(weights, "d", (16, 64), True) is None  # stored dense: stays dense


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_hqq_follows_its_definition_and_beats_round_to_nearest(bits: int) -> None:
    w = torch.randn(32, 128)
    q = quantize_hqq(w, bits)
    group = {4: 64, 3: 64, 2: 16}[bits]
    assert q.group_size == group and q.scales.shape == (32, 128 // group)
    # Read the codes back by the documented packing: little-endian within each byte.
    per_byte = 8 // q.bits
    shifts = torch.arange(per_byte) * q.bits
    codes = ((q.codes[..., None].long() >> shifts) & (2**q.bits - 1)).view(32, -1)
    assert codes.max() < 2**bits
    groups = torch.arange(128) // group
    assert torch.allclose(q.dequantize(), codes * q.scales[:, groups] + q.offsets[:, groups], atol=1e-6)
    # Plain min-max round-to-nearest with the same groups, for comparison.
    g = w.view(-1, group)
    low, high = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    step = (high - low) / (2**bits - 1)
    rtn = (torch.round((g - low) / step) * step + low).view_as(w)
    assert (q.dequantize() - w).abs().mean() <= (rtn - w).abs().mean() * 1.001
    _check_matmul(q)


def test_parts_fuse_into_one_matrix_unless_their_channel_orders_differ(tmp_path: Path) -> None:
    plain = [quantize_4bit(torch.randn(n, 64), "nf4") for n in (16, 8, 8)]
    fused = stack_parts(plain)
    assert isinstance(fused, GroupedWeight) and fused.out_features == 32
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in plain]))
    _check_matmul(fused)
    ordered = []
    for seed in (1, 2):
        tensors, _ = gptq_pack(torch.randn(16, 64), 4, 16, act_order=True, seed=seed)
        weights = _weights(tmp_path / str(seed), {f"m.{k}": v for k, v in tensors.items()})
        ordered.append(GptqCheckpoint(4, 16).load(weights, "m", (16, 64), True))
    mixed = stack_parts(ordered)
    assert isinstance(mixed, StackedWeight)
    _check_matmul(mixed)


def test_bad_gptq_checkpoints_are_refused_with_the_reason(tmp_path: Path) -> None:
    tensors, _ = gptq_pack(torch.randn(16, 64), 4, 16)
    weights = _weights(tmp_path / "a", {f"m.{k}": v for k, v in tensors.items()} | {"d.weight": torch.randn(16, 64)})
    with pytest.raises(QuantizationError, match="tensor 'd.qweight' is missing"):
        GptqCheckpoint(4, 16).load(weights, "d", (16, 64), required=True)
    assert GptqCheckpoint(4, 16, dense_modules=("d",)).load(weights, "d", (16, 64), required=True) is None
    with pytest.raises(QuantizationError, match="at 8 bits pack into 16"):  # the shapes say 4 bits
        GptqCheckpoint(8, 16).load(weights, "m", (16, 64), required=True)
    uneven = dict(tensors, g_idx=torch.tensor([0] * 20 + [1] * 12 + [2] * 16 + [3] * 16, dtype=torch.int32))
    weights = _weights(tmp_path / "b", {f"m.{k}": v for k, v in uneven.items()})
    with pytest.raises(QuantizationError, match="groups of unequal sizes"):
        GptqCheckpoint(4, 16).load(weights, "m", (16, 64), required=True)


def _model_dir(tmp_path: Path, quantization_config: dict | None, legacy: dict | None = None) -> Path:
    tmp_path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"]}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    if legacy is not None:
        (tmp_path / "quantize_config.json").write_text(json.dumps(legacy))
    return tmp_path


def test_checkpoint_quantization_meets_the_requested_method(tmp_path: Path) -> None:
    gptq = _model_dir(tmp_path / "gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128})
    method, reader = checkpoint.resolve(None, gptq)  # detected and served as it is
    assert method == "gptq" and isinstance(reader, GptqCheckpoint) and reader.zeros_minus_one
    assert checkpoint.resolve("gptq", gptq)[0] == "gptq"
    with pytest.raises(QuantizationError, match="--quantize awq contradicts the checkpoint"):
        checkpoint.resolve("awq", gptq)
    with pytest.raises(QuantizationError, match="--quantize bitsandbytes-nf4 contradicts"):
        checkpoint.resolve("bitsandbytes-nf4", gptq)
    legacy = _model_dir(tmp_path / "legacy", None, {"bits": 3, "group_size": -1, "desc_act": True})
    method, reader = checkpoint.resolve(None, legacy)
    assert method == "gptq" and reader.bits == 3 and reader.group_size == -1
    bad_bits = _model_dir(tmp_path / "bits", {"quant_method": "gptq", "bits": 5, "group_size": 128})
    with pytest.raises(QuantizationError, match="GPTQ with 5 bits is not supported"):
        checkpoint.resolve(None, bad_bits)
    bad_group = _model_dir(tmp_path / "group", {"quant_method": "gptq", "bits": 4, "group_size": 0})
    with pytest.raises(QuantizationError, match="group_size 0 is not supported"):
        checkpoint.resolve(None, bad_group)
    gemv = _model_dir(tmp_path / "gemv", {"quant_method": "awq", "bits": 4, "version": "gemv"})
    with pytest.raises(QuantizationError, match="only 4-bit GEMM"):
        checkpoint.resolve(None, gemv)
    unknown = _model_dir(tmp_path / "aqlm", {"quant_method": "aqlm"})
    with pytest.raises(QuantizationError, match="quantized with 'aqlm', which this server cannot read"):
        checkpoint.resolve(None, unknown)
    dense = _model_dir(tmp_path / "dense", None)
    assert checkpoint.resolve("hqq-4bit", dense) == ("hqq-4bit", None)
    assert isinstance(checkpoint.resolve("gptq", dense)[1], GptqCheckpoint)  # tensors checked while loading


def test_exl2_and_unknown_methods_are_refused() -> None:
    with pytest.raises(QuantizationError, match="exl2 needs ExLlamaV2's CUDA kernels"):
        quantizer("exl2")
    with pytest.raises(QuantizationError, match="unknown --quantize 'int3'"):
        quantizer("int3")
    assert quantizer(None) is None and quantizer("gptq") is None
