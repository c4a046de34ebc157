"""The one linear abstraction: a (possibly fused, possibly sharded) weight with an optional bias.

Fused projections (q|k|v, gate|up) are one matmul. `part_names`/`part_sizes` are the checkpoint
modules the weight was built from (what LoRA adapters target); `out_splits` is how callers split the
output (the same as the parts, unless the checkpoint itself stores a fused module such as `qkv_proj`).
The base matmul runs once for the whole batch; when adapters are attached (`lora`), their low-rank
updates are added per adapter segment. The weight is a dense tensor or a quantized `WeightFormat`
(`layers.quant`); nothing else here depends on which.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import torch
import torch.nn.functional as F

from ..utils.weights import Weights, WeightsError
from .quant import Quantizer, WeightFormat
from .quant.grouped import stack_parts


class LoraRows(Protocol):
    """What an adapted linear needs of its batch: a `ForwardBatch`, or a MoE expert's `ExpertRows`."""

    lora_segments: list[tuple[int, int, int]]  # (start, end, adapter_index) token ranges


class LinearHook(Protocol):
    """An update added to a `Linear`'s output after its base matmul: LoRA's `adapters.lora.LoraSlots`.

    Declared here, on the layers' side, so that layers never import adapter code: whatever is
    attached to `Linear.lora` only has to offer these two methods.
    """

    def adapter_indices(self) -> Collection[int]:
        """The adapters that have an update on this linear."""
        ...

    def add_to(self, y: torch.Tensor, x: torch.Tensor, rows: LoraRows) -> None:
        """y [num_tokens, out_features] += each segment's update of x [num_tokens, in_features]."""
        ...


class Linear:
    def __init__(
        self,
        weight: torch.Tensor | WeightFormat,
        bias: torch.Tensor | None,
        out_splits: list[int],
        part_names: list[str] | None = None,
        part_sizes: list[int] | None = None,
    ) -> None:
        self.weight = weight  # [out_features, in_features], dense or quantized
        self.bias = bias  # [out_features] or None
        self.out_splits = out_splits  # how callers split the output along out_features
        self.part_names = part_names or []  # checkpoint module name of each stored part
        self.part_sizes = part_sizes or list(out_splits)  # out_features of each stored part
        self.lora: LinearHook | None = None  # set by adapters.lora.attach_lora for adaptable modules

    @property
    def in_features(self) -> int:
        w = self.weight
        return w.shape[1] if isinstance(w, torch.Tensor) else w.in_features

    def quantize(self, quantizer: Quantizer | None) -> None:
        """Replace a dense weight by its quantized format (the dense tensor is released)."""
        if quantizer is not None and isinstance(self.weight, torch.Tensor):
            self.weight = quantizer(self.weight)

    def __call__(self, x: torch.Tensor, meta: LoraRows | None = None) -> torch.Tensor:
        """x: [num_tokens, in_features] → [num_tokens, out_features]."""
        w = self.weight
        if isinstance(w, torch.Tensor):
            y = F.linear(x, w, self.bias)
        else:
            y = w.matmul(x)
            if self.bias is not None:
                y += self.bias
        if self.lora is not None and meta is not None and meta.lora_segments:
            self.lora.add_to(y, x, meta)
        return y

    @classmethod
    def load(
        cls,
        weights: Weights,
        prefixes: list[str],
        bias: bool,
        shapes: list[tuple[int, int]] | None = None,
        transposed: bool = False,
        out_splits: list[int] | None = None,
        quantize: bool = True,
    ) -> Linear:
        """Load and fuse `prefix.weight` (+ `prefix.bias`) for each prefix along the output dim.

        `shapes` gives each part's expected [out, in]; `transposed` reads Conv1D-style [in, out] tensors;
        `out_splits` splits a checkpoint-fused module (one prefix) into its logical outputs.
        A pre-quantized checkpoint's modules load in its format (`weights.checkpoint_format`); dense
        ones take the load-time `weights.quantizer` format when `quantize` (the default).
        """
        parts: list[torch.Tensor | WeightFormat] = []
        biases = []
        for i, prefix in enumerate(prefixes):
            shape = shapes[i] if shapes is not None else None
            part = None
            if weights.checkpoint_format is not None:
                part = weights.checkpoint_format.load(weights, prefix, shape, required=quantize)
            if part is None:
                expect = shape[::-1] if shape is not None and transposed else shape
                w = weights.get(f"{prefix}.weight", expect)
                part = w.t().contiguous() if transposed else w
            parts.append(part)
            if bias:
                biases.append(weights.get(f"{prefix}.bias", (_out_features(part),)))
        fused_bias = None
        if bias:
            fused_bias = biases[0] if len(biases) == 1 else torch.cat(biases, dim=0)
        sizes = [_out_features(p) for p in parts]
        if all(isinstance(p, torch.Tensor) for p in parts):
            weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # type: ignore[arg-type]
        elif not any(isinstance(p, torch.Tensor) for p in parts):
            weight = stack_parts(parts)
        else:
            raise WeightsError(f"{', '.join(prefixes)}: some parts are quantized in the checkpoint and some are not")
        linear = cls(weight, fused_bias, out_splits or sizes, list(prefixes), sizes)
        if quantize:
            linear.quantize(weights.quantizer)
        return linear


def _out_features(weight: torch.Tensor | WeightFormat) -> int:
    return weight.shape[0] if isinstance(weight, torch.Tensor) else weight.out_features
