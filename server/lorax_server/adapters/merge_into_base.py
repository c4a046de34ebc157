"""`--merge-adapter-weights`: fold one LoRA adapter into the base model's weights at start-up.

Every module the adapter targets gets W + scale·B·A, computed in float32 and stored in the weight's
dtype, as peft's `merge_and_unload` does. The served model is then that adapter's model at the base
model's cost: no LoRA work in any step. Under tensor parallelism each rank adds its slice of the update
(`LinearShard.lora`). A weight packed for CPU matmuls is unpacked, updated and packed again; a quantized
weight cannot take an exact update, so merging into one is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..layers.linear import Linear
from ..layers.packed import PackedWeight
from .loader import MEDUSA, AdapterLoadError, load_adapter


def merge_into_base(model, adapter_dir: Path) -> int:  # noqa: ANN001 - a CausalLM (see AdapterManager)
    """Add the update of every module the adapter in `adapter_dir` targets to `model`'s weights; returns
    how many modules were merged. Raises AdapterLoadError, before changing anything, for an adapter the
    model cannot take or a module whose weight is quantized."""
    targets = model.adaptable_linears()
    modules = load_adapter(adapter_dir, targets, model.config, model.dtype)
    if MEDUSA in modules:
        raise AdapterLoadError("its Medusa heads cannot be merged into the base model's weights")
    if not modules:
        raise AdapterLoadError("it has no LoRA weights to merge")
    quantized = sorted(name for name in modules if targets[name][0].quantized)
    if quantized:
        raise AdapterLoadError(
            f"the base model's weights are quantized ({quantized[0]}, ...): an update cannot be added to them "
            "exactly; serve the adapter dynamically instead"
        )
    # id(linear) → the linear, and each part's (first row, this rank's update)
    updates: dict[int, tuple[Linear, list[tuple[int, torch.Tensor]]]] = {}
    for name, m in modules.items():
        linear, part = targets[name]
        a, b = (m.lora_a, m.lora_b) if linear.shard is None else linear.shard.lora(part, m.lora_a, m.lora_b)
        delta = (b.float() @ a.float()) * m.scale  # [this rank's rows of the part, its in_features]
        updates.setdefault(id(linear), (linear, []))[1].append((sum(linear.part_sizes[:part]), delta))
    for linear, parts in updates.values():
        _add_rows(linear, parts)
    return len(modules)


def _add_rows(linear: Linear, updates: list[tuple[int, torch.Tensor]]) -> None:
    """Replace `linear`'s weight by a copy with each update added at its rows. A copy, not an in-place
    add: a weight tied to another tensor (an embedding) keeps that tensor unchanged."""
    packed = isinstance(linear.weight, PackedWeight)
    dense = linear.weight.dequantize() if packed else linear.weight
    merged = dense.clone()
    for start, delta in updates:
        rows = merged[start : start + delta.shape[0]]
        rows.copy_((rows.float() + delta.to(rows.device)).to(rows.dtype))
    linear.weight = PackedWeight(merged) if packed else merged
