"""Quantized bases under tensor parallelism. Pre-quantized GPTQ, AWQ and FP8 checkpoints load as each
rank's slice, equal to the same slice of the one-shard weight: output rows (column-parallel, any
ranges) and input columns (row-parallel, with their groups). Slices that would need groups of unequal
sizes are refused with the reason: act-order groups scattered over the columns, a group or FP8 block
cut by the slice's start. Two real ranks then run a mixed-adapter batch like one process, for each
checkpoint format and for nf4 quantized at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from families import ATTN, MLP
from quant_packers import awq_pack, gptq_pack, write_prequantized
from safetensors.torch import save_file
from tiny_models import make_lora_adapter, make_model
from tp_ranks import mixed_batch_run, run_ranks

from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.parallel import ShardingError
from lorax_server.layers.quant.affine import take_ranges
from lorax_server.layers.quant.awq import AwqCheckpoint
from lorax_server.layers.quant.fp8 import E4M3_MAX, Fp8Checkpoint
from lorax_server.layers.quant.gptq import GptqCheckpoint
from lorax_server.models.loader import load_model
from lorax_server.utils.weights import Weights

CPU = torch.device("cpu")
WORLD = 2
OUT, IN = 48, 96


def _rows(rank: int) -> tuple[tuple[int, int], ...]:
    """A rank's output rows of a [48, in] weight fused like q|k|v (32 | 8 | 8): ranges not aligned to 8."""
    return ((rank * 16, 16), (32 + rank * 4, 4), (40 + rank * 4, 4))


def _weights(model_dir: Path, tensors: dict[str, torch.Tensor], reader, rank: int, world: int = WORLD) -> Weights:  # noqa: ANN001
    """Rank `rank` of `world` over a checkpoint of one module "m" (written on first use)."""
    if not (model_dir / "model.safetensors").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        save_file({f"m.{k}": v.contiguous() for k, v in tensors.items()}, str(model_dir / "model.safetensors"))
    return Weights(model_dir, torch.float32, CPU, rank, world, checkpoint_format=reader)


def _assert_slices_equal_the_whole(model_dir: Path, tensors: dict, reader, shape: tuple[int, int]) -> None:  # noqa: ANN001
    """Each rank's rows and columns dequantize to the same slice of the one-shard weight, and the
    ranks' columns together hold the one-shard weight's codes (a group spanning both slices has its
    scales on both)."""
    whole = reader.load(_weights(model_dir, tensors, reader, 0, world=1), "m", shape, True)
    want = whole.dequantize()
    column_codes = 0
    for rank in range(WORLD):
        weights = _weights(model_dir, tensors, reader, rank)
        rows = reader.load(weights, "m", shape, True, rows=_rows(rank))
        assert torch.equal(rows.dequantize(), take_ranges(want, 0, _rows(rank)))
        start, size = weights.tp.split(shape[1], "input columns")
        cols = reader.load(weights, "m", shape, True, cols=(start, size))
        assert torch.equal(cols.dequantize(), want[:, start : start + size])
        x = torch.randn(3, size)
        assert (cols.matmul(x) - x @ want[:, start : start + size].t()).abs().max() < 1e-4
        column_codes += cols.codes.numel()
    assert column_codes == whole.codes.numel()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("group_size", "act_order"), [(16, False), (-1, False), (16, True)])
def test_gptq_slices_equal_the_one_shard_weight(tmp_path: Path, bits: int, group_size: int, act_order: bool) -> None:
    """96 inputs: rank 1's columns start at 48, inside a 32-value word period (3-bit values straddle
    words). Act-order here keeps each group within one rank's columns: exact, so it loads."""
    tensors, _ = gptq_pack(torch.randn(OUT, IN), bits, group_size, act_order, shards=WORLD)
    reader = GptqCheckpoint(bits, group_size)
    _assert_slices_equal_the_whole(tmp_path, tensors, reader, (OUT, IN))
    if act_order:
        assert reader.load(_weights(tmp_path, tensors, reader, 1), "m", (OUT, IN), True, cols=(48, 48)).perm is not None


def test_awq_slices_equal_the_one_shard_weight(tmp_path: Path) -> None:
    tensors, _ = awq_pack(torch.randn(OUT, 128), 32)
    _assert_slices_equal_the_whole(tmp_path, tensors, AwqCheckpoint(32), (OUT, 128))


def _fp8(w: torch.Tensor, kind: str, block: tuple[int, int] = (16, 32)) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """FP8 tensors of `w` with scales per output row, per tensor or per `block`, and their dequantized weight."""
    if kind == "block":
        (rows, cols), (out_features, in_features) = block, w.shape
        pad = (0, -in_features % cols, 0, -out_features % rows)
        tiles = torch.nn.functional.pad(w.abs(), pad).unflatten(1, (-1, cols)).unflatten(0, (-1, rows)).amax((1, 3))
        tiles = tiles / E4M3_MAX
        scale = tiles.repeat_interleave(rows, 0)[:out_features].repeat_interleave(cols, 1)[:, :in_features]
        names = {"weight_scale_inv": tiles}
    else:
        scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX if kind == "row" else w.abs().max() / E4M3_MAX
        names = {"weight_scale": scale}
    values = (w / scale).to(torch.float8_e4m3fn)
    return {"weight": values, **names}, values.float() * scale


@pytest.mark.parametrize("kind", ["row", "tensor", "block"])
def test_fp8_slices_equal_the_one_shard_weight(tmp_path: Path, kind: str) -> None:
    """Block-wise: output rows need not follow the 16-row blocks (scales are looked up row by row);
    the 64-column slices keep whole 32-column blocks."""
    tensors, _ = _fp8(torch.randn(OUT, 128) * 3, kind)
    _assert_slices_equal_the_whole(tmp_path, tensors, Fp8Checkpoint((16, 32)), (OUT, 128))


def test_act_order_groups_scattered_over_the_columns_are_refused(tmp_path: Path) -> None:
    tensors, _ = gptq_pack(torch.randn(OUT, IN), 4, 16, act_order=True)  # one permutation of all 96 columns
    reader = GptqCheckpoint(4, 16)
    weights = _weights(tmp_path, tensors, reader, 1)
    with pytest.raises(ShardingError, match=r"act-order \(desc_act\).*scattered.*input columns 48\.\.96") as e:
        reader.load(weights, "m", (OUT, IN), True, cols=(48, 48))
    assert "one shard" in str(e.value) and "without desc_act" in str(e.value)
    whole = reader.load(_weights(tmp_path, tensors, reader, 0, world=1), "m", (OUT, IN), True)
    rows = reader.load(weights, "m", (OUT, IN), True, rows=_rows(1))  # output rows: every group whole
    assert torch.equal(rows.dequantize(), take_ranges(whole.dequantize(), 0, _rows(1)))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_group_cut_by_the_slice_start_is_refused(tmp_path: Path, method: str) -> None:
    """96 inputs in groups of 32: rank 1's columns 48..96 would start with half a group. Columns
    16..48 hold two equal halves of groups 0 and 1: exact as groups of 16, so they load."""
    w = torch.randn(OUT, IN)
    tensors, dequantized = gptq_pack(w, 4, 32) if method == "gptq" else awq_pack(w, 32)
    reader = GptqCheckpoint(4, 32) if method == "gptq" else AwqCheckpoint(32)
    weights = _weights(tmp_path, tensors, reader, 1)
    with pytest.raises(ShardingError, match=r"group size 32 does not divide .*input columns 48\.\.96 of 96"):
        reader.load(weights, "m", (OUT, IN), True, cols=(48, 48))
    halves = reader.load(weights, "m", (OUT, IN), True, cols=(16, 32))
    assert halves.group_size == 16 and torch.equal(halves.dequantize(), dequantized[:, 16:48])


def test_an_fp8_block_cut_by_the_slice_start_is_refused(tmp_path: Path) -> None:
    w = torch.randn(OUT, 128)
    reader = Fp8Checkpoint((16, 40))  # blocks of 40 columns: rank 1's columns 64..128 start inside one
    tensors = {"weight": w.to(torch.float8_e4m3fn), "weight_scale_inv": torch.rand(3, 4) + 0.5}
    with pytest.raises(ShardingError, match=r"16x40 blocks.*block size 40 does not divide .*columns 64\.\.128"):
        reader.load(_weights(tmp_path, tensors, reader, 1), "m", (OUT, 128), True, cols=(64, 64))


# ---------------------------------------------------------------------------------------------- 2 ranks
# name → (quant_method, quantization_config, pack): every module quantized by `pack`
CHECKPOINTS = {
    "gptq": ("gptq", {"bits": 4, "group_size": 32, "desc_act": False, "sym": False}, lambda w: gptq_pack(w, 4, 32)),
    "gptq_act_order": ("gptq", {"bits": 3, "group_size": 32, "desc_act": True, "sym": False},
                       lambda w: gptq_pack(w, 3, 32, act_order=True, shards=WORLD)),
    "awq": ("awq", {"bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}, lambda w: awq_pack(w, 32)),
    "fp8_per_row": ("compressed-tensors", {}, lambda w: _fp8(w, "row")),
    "fp8_block": ("fp8", {"weight_block_size": [64, 32]}, lambda w: _fp8(w, "block", (64, 32))),
}  # fmt: skip


def test_two_ranks_equal_one_process_on_quantized_bases(tmp_path: Path) -> None:
    """Llama, hidden 128, intermediate 256, 4 heads (2 kv heads): o_proj and down_proj split into 64-
    and 128-column slices (whole groups of 32, FP8 blocks of 32 columns, nf4 blocks of 64); the FP8
    checkpoint's 64-row blocks are cut by the kv heads' 32-row slices. Two adapters in the batch."""
    model_dir = make_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp_path / "base",
                           hidden_size=128, intermediate_size=256, num_attention_heads=4,
                           num_key_value_heads=2)  # fmt: skip
    dense = load_model(model_dir, TorchAttention(4), CPU, "float32")
    adapters = [str(make_lora_adapter(model_dir, tmp_path / f"lora{i}", i, r=8, lora_alpha=16, target_modules=t))
                for i, t in enumerate([ATTN, MLP], start=1)]  # fmt: skip
    jobs = [{"name": "nf4", "model_dir": str(model_dir), "adapters": adapters, "quantize": "bitsandbytes-nf4"}]
    for name, (method, config, pack) in CHECKPOINTS.items():
        out, _ = write_prequantized(model_dir, dense, tmp_path / name, tmp_path / f"{name}_dense", method, config, pack)
        jobs.append({"name": name, "model_dir": str(out), "adapters": adapters})
    sharded = run_ranks(jobs, tmp_path / "ranks.pt", world_size=WORLD, port=29687)
    for job in jobs:
        want = mixed_batch_run(job["model_dir"], adapters, quantize=job.get("quantize"))
        got = sharded[job["name"]]
        assert torch.equal(got["decoded"].argmax(-1), want["decoded"].argmax(-1)), job["name"]
        for key in ("prefill", "decoded"):
            assert (got[key] - want[key]).abs().max() < 1e-4, (job["name"], key)
