"""Pre-quantized checkpoints written from the public layouts, independently of the server's readers:
GPTQ (AutoGPTQ / optimum: qweight packed along the inputs as a little-endian bit stream, qzeros along
the outputs, zero − 1 stored in the v1 format, g_idx) and AWQ (AutoAWQ GEMM: both packed along the
outputs with the interleaved nibble order). Each packer also returns the dequantized weight computed
from the integers, which the `transformers` reference runs with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model

AWQ_NIBBLE_COLUMNS = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column AWQ_NIBBLE_COLUMNS[i]


def _stream_words(values: np.ndarray, bits: int) -> np.ndarray:
    """values [count, columns] (non-negative ints < 2**bits) → int32 [⌈count·bits/32⌉, columns]: each
    column a little-endian bit stream, value j at bits j·bits; the last word is zero-padded."""
    count, columns = values.shape
    words = np.zeros((-(-count * bits // 32), columns), dtype=np.uint64)
    for j in range(count):
        position = j * bits
        word, offset = divmod(position, 32)
        v = values[j].astype(np.uint64)
        words[word] |= (v << np.uint64(offset)) & np.uint64(0xFFFFFFFF)
        if offset + bits > 32:
            words[word + 1] |= v >> np.uint64(32 - offset)
    return words.astype(np.uint32).view(np.int32)


def _rtn(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale (float16) and integer zero of each row of w [rows, group]."""
    top = 2**bits - 1
    if sym:
        scale = (w.abs().amax(dim=1) * 2 / top).clamp_min(1e-5).half()
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int64)
    else:
        low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = ((high - low) / top).clamp_min(1e-5).half()
        zero = torch.round(-low / scale.float()).clamp(0, top).long()
    return scale, zero


def gptq_pack(
    w: torch.Tensor,  # [out, in] float
    bits: int,
    group_size: int,  # -1: one group
    act_order: bool = False,
    sym: bool = False,
    v2: bool = False,
    seed: int = 0,
    shards: int = 1,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPTQ tensors (qweight, qzeros, scales, g_idx) and the dequantized weight [out, in] float32.
    `shards` > 1: the act-order permutation stays within each of that many equal blocks of input
    columns (so each block, a tensor-parallel rank's columns, holds whole groups)."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    order = torch.arange(in_features)
    if act_order:  # GPTQ quantizes columns in a data-dependent order; groups follow that order
        generator, block = torch.Generator().manual_seed(seed), in_features // shards
        order = torch.cat([b * block + torch.randperm(block, generator=generator) for b in range(shards)])
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[order] = torch.arange(in_features) // size
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    for g in range(groups):
        scales[g], zeros[g] = _rtn(w[:, g_idx == g].float(), bits, sym)
    s, z = scales.float()[g_idx].t(), zeros[g_idx].t()  # [out, in]
    q = torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1).long()  # [out, in]
    dequantized = s * (q - z).float()
    stored_zeros = zeros if v2 else (zeros - 1) % 2**bits
    tensors = {
        "qweight": torch.from_numpy(_stream_words(q.t().numpy(), bits)),
        "qzeros": torch.from_numpy(_stream_words(stored_zeros.t().numpy(), bits)).t().contiguous(),
        "scales": scales,
        "g_idx": g_idx.int(),
    }
    return tensors, dequantized


def awq_pack(w: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AWQ GEMM tensors (qweight, qzeros, scales) and the dequantized weight [out, in] float32."""
    out_features, in_features = w.shape
    groups = -(-in_features // group_size)
    g_idx = torch.arange(in_features) // group_size
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    for g in range(groups):
        scales[g], zeros[g] = _rtn(w[:, g_idx == g].float(), 4, sym=False)
    s, z = scales.float()[g_idx].t(), zeros[g_idx].t()
    q = torch.clamp(torch.round(w.float() / s) + z, 0, 15).long()
    dequantized = s * (q - z).float()

    def pack_rows(values: torch.Tensor) -> torch.Tensor:  # [rows, columns] → int32 [rows, columns / 8]
        rows, columns = values.shape
        words = np.zeros((rows, columns // 8), dtype=np.uint64)
        v = values.numpy().astype(np.uint64).reshape(rows, columns // 8, 8)
        for nibble, column in enumerate(AWQ_NIBBLE_COLUMNS):
            words |= v[:, :, column] << np.uint64(4 * nibble)
        return torch.from_numpy(words.astype(np.uint32).view(np.int32))

    tensors = {"qweight": pack_rows(q.t().contiguous()), "qzeros": pack_rows(zeros), "scales": scales}
    return tensors, dequantized


def dense_modules(model) -> list[tuple[str, int, int]]:  # noqa: ANN001
    """(checkpoint module, out, in) of every linear our dense-loaded model would quantize."""
    found = []
    for layer in model.layers:
        for module in layer.linears():
            for linear in module if isinstance(module, list) else [module]:
                if not linear.part_names:  # DBRX's stacked experts: not linear modules, so GPTQ leaves them
                    continue
                for name, size in zip(linear.part_names, linear.part_sizes, strict=True):
                    if not name.endswith((".gate", ".router.layer")):  # MoE routers stay dense
                        found.append((name, size, linear.in_features))
    return found


def write_prequantized(
    model_dir: Path,
    model,  # noqa: ANN001 - our dense-loaded model, to list its linear modules
    out: Path,
    reference: Path,
    method: str,
    config: dict,
    pack,  # noqa: ANN001 - w [out, in] → (tensors, dequantized)
) -> tuple[Path, Path]:
    """`out`: the checkpoint with every linear module quantized by `pack` and `quantization_config`
    in config.json; `reference`: the same checkpoint, dense, with the dequantized weights."""
    tensors = load_file(str(next(model_dir.glob("*.safetensors"))))
    quantized, dense = dict(tensors), dict(tensors)
    conv1d = model.spec.conv1d_weights  # GPT-2 stores [in, out]
    for name, _, _ in dense_modules(model):
        key = f"{name}.weight"
        stored = tensors[key]
        packed, dequantized = pack(stored.t() if conv1d else stored)
        del quantized[key]
        quantized.update({f"{name}.{k}": v for k, v in packed.items()})
        dense[key] = (dequantized.t() if conv1d else dequantized).contiguous().to(stored.dtype)
    for target, weights in ((out, quantized), (reference, dense)):
        target.mkdir(parents=True)
        for f in model_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy(f, target / f.name)
        save_file(weights, str(target / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, **config}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out, reference


def gptq_checkpoint(
    model_dir: Path, tmp: Path, bits: int = 4, group_size: int = 32, act_order: bool = True
) -> tuple[Path, Path]:
    """A GPTQ checkpoint of `model_dir` (asymmetric, v1 zeros) and its dequantized reference."""
    dense = load_model(model_dir, TorchAttention(4), torch.device("cpu"), "float32")
    config = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False}
    return write_prequantized(model_dir, dense, tmp / "gptq", tmp / "gptq_reference", "gptq", config,
                              lambda w: gptq_pack(w, bits, group_size, act_order))  # fmt: skip
