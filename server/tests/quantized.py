"""The independent reference for quantized bases: a checkpoint whose weights are replaced by their
fake-quantized values, computed from the format's definition (not with our code), for `transformers`
to run. Shared by the parity tests and the HTTP tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorax_server.layers.linear import Linear


def fake_int8(w: torch.Tensor, dim: int) -> torch.Tensor:
    """eetq's definition: symmetric int8 per output channel, scale = max |w| / 127, round to nearest.
    `dim` is the output dimension of the stored tensor (1 for GPT-2's Conv1D [in, out])."""
    rows = w.float() if dim == 0 else w.float().t()
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(rows / scale), -127, 127) * scale
    return q if dim == 0 else q.t().contiguous()


def quantized_linears(model) -> list[Linear]:  # noqa: ANN001
    return [
        linear
        for layer in model.layers
        for module in layer.linears()
        for linear in (module if isinstance(module, list) else [module])
        if linear.quantized
    ]


def reference_checkpoint(model_dir: Path, model, out: Path) -> Path:  # noqa: ANN001
    """The checkpoint with every weight our model quantized replaced by its independent fake-int8."""
    tensors = load_file(str(next(model_dir.glob("*.safetensors"))))
    conv1d = model.spec.conv1d_weights  # GPT-2 stores [in, out]
    done = set()
    for linear in quantized_linears(model):
        if not linear.part_names:  # DBRX's stacked experts: below
            continue
        for name, size in zip(linear.part_names, linear.part_sizes, strict=True):
            key = f"{name}.weight"
            w = tensors[key]
            dim = 1 if conv1d else 0
            assert w.shape[dim] == size, (key, w.shape, size)
            tensors[key] = fake_int8(w, dim)
            done.add(key)
    stacked = model.spec.moe_stacked  # DBRX: each projection's experts in one tensor [experts * inter, hidden]
    for key in [k for k in tensors if stacked and f".{stacked}." in k]:
        w, experts = tensors[key], model.config.num_experts
        if key.endswith((".w1", ".v1")):  # gate and up: rows are output channels
            tensors[key] = fake_int8(w, 0)
        else:  # w2: expert e's down weight is its [inter, hidden] block transposed: columns are outputs
            blocks = w.view(experts, -1, w.shape[1])
            tensors[key] = torch.cat([fake_int8(b, 1) for b in blocks]).view_as(w)
        done.add(key)
    assert done, "nothing was quantized"
    return save_checkpoint(model_dir, tensors, out)


def dequantized_checkpoint(model_dir: Path, model, out: Path) -> Path:  # noqa: ANN001
    """The checkpoint with every weight our model quantized replaced by its `dequantize()`: the
    reference for load-time methods, whose `dequantize()` the format tests check independently."""
    tensors = load_file(str(next(model_dir.glob("*.safetensors"))))
    conv1d = model.spec.conv1d_weights
    for linear in quantized_linears(model):
        if not linear.part_names:
            continue
        w = linear.weight.dequantize()
        for name, part in zip(linear.part_names, w.split(linear.part_sizes), strict=True):
            key = f"{name}.weight"
            tensors[key] = (part.t() if conv1d else part).contiguous().to(tensors[key].dtype)
    stacked = model.spec.moe_stacked  # DBRX: w1 | v1 [experts * inter, hidden], w2 stored transposed
    if stacked:
        for i, layer in enumerate(model.layers):
            moe, prefix = layer.mlp, f"{model.spec.layer.format(i=i)}.{stacked}"
            gate_up = torch.stack([lin.weight.dequantize() for lin in moe.gate_up])  # [e, 2 * inter, hidden]
            inter = gate_up.shape[1] // 2
            tensors[f"{prefix}.w1"] = gate_up[:, :inter].reshape(-1, gate_up.shape[2]).contiguous()
            tensors[f"{prefix}.v1"] = gate_up[:, inter:].reshape(-1, gate_up.shape[2]).contiguous()
            down = torch.stack([lin.weight.dequantize().t() for lin in moe.down])  # [e, inter, hidden]
            tensors[f"{prefix}.w2"] = down.reshape(-1, down.shape[2]).contiguous()
    return save_checkpoint(model_dir, tensors, out)


def save_checkpoint(model_dir: Path, tensors: dict[str, torch.Tensor], out: Path) -> Path:
    """`out`: `model_dir`'s config and tokenizer files with `tensors` as its weights."""
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"))
    return out
