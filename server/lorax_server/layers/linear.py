"""The one linear abstraction: a (possibly fused, possibly sharded) weight with an optional bias.

Fused projections (q|k|v, gate|up) are one matmul. `part_names`/`part_sizes` are the checkpoint
modules the weight was built from (what LoRA adapters target); `out_splits` is how callers split the
output (the same as the parts, unless the checkpoint itself stores a fused module such as `qkv_proj`).
The base matmul runs once for the whole batch; when adapters are attached (`lora`), their low-rank
updates are added per adapter segment. Under tensor parallelism a linear holds its rank's slice
(`shard`, see `layers.parallel`); a row-parallel one sums its partial output over the ranks (`reduce`)
after the LoRA updates, and adds its bias once, after the sum. The weight is a dense tensor or a
`WeightFormat`: quantized (`layers.quant`) or packed for CPU matmuls (`layers.packed`); nothing else
here depends on which.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import torch
import torch.nn.functional as F

from ..utils.weights import Weights, WeightsError
from .packed import PackedWeight
from .parallel import LinearShard, Range, TensorParallel
from .quant import Quantizer, WeightFormat
from .quant.grouped import stack_parts


class LoraRows(Protocol):
    """What an adapted linear needs of its batch: a `ForwardBatch`, or a MoE expert's `ExpertRows`."""

    lora_segments: list[tuple[int, int, int]]  # (start, end, adapter_index) token ranges
    pinned_stacks: bool  # a captured decode graph's batch: adapters apply whatever its segments


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
        self.shard: LinearShard | None = None  # this rank's slice of the whole weight; None: all of it
        self.reduce: TensorParallel | None = None  # row-parallel: the group the output is summed over

    @property
    def full_in_features(self) -> int:
        """in_features of the whole, unsharded weight (what adapters are shaped for)."""
        return self.shard.full_in_features if self.shard is not None else self.in_features

    @property
    def full_part_sizes(self) -> list[int]:
        """Each part's out_features in the whole, unsharded weight."""
        return list(self.shard.full_part_sizes) if self.shard is not None else self.part_sizes

    @property
    def in_features(self) -> int:
        w = self.weight
        return w.shape[1] if isinstance(w, torch.Tensor) else w.in_features

    @property
    def quantized(self) -> bool:
        """Whether the weight is stored quantized (a dense weight, packed for the CPU or not, is not)."""
        return not isinstance(self.weight, (torch.Tensor, PackedWeight))

    def quantize(self, quantizer: Quantizer | None) -> None:
        """Replace a dense weight by its quantized format (the dense tensor is released)."""
        if quantizer is not None and isinstance(self.weight, torch.Tensor):
            self.weight = quantizer(self.weight)

    def __call__(self, x: torch.Tensor, meta: LoraRows | None = None) -> torch.Tensor:
        """x: [num_tokens, in_features] → [num_tokens, out_features]."""
        w = self.weight
        bias_now = self.bias if self.reduce is None else None  # row-parallel: added once, after the sum
        if isinstance(w, torch.Tensor):
            y = F.linear(x, w, bias_now)
        else:
            y = w.matmul(x)
            if bias_now is not None:
                y += bias_now
        if self.lora is not None and meta is not None and (meta.lora_segments or meta.pinned_stacks):
            self.lora.add_to(y, x, meta)
        if self.reduce is not None:
            self.reduce.all_reduce(y)
            if self.bias is not None:
                y += self.bias
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
        rows: list[tuple[Range, ...]] | None = None,
        cols: Range | None = None,
        reduce: bool = True,
    ) -> Linear:
        """Load and fuse `prefix.weight` (+ `prefix.bias`) for each prefix along the output dim.

        `shapes` gives each part's expected [out, in]; `transposed` reads Conv1D-style [in, out] tensors;
        `out_splits` splits a checkpoint-fused module (one prefix) into its logical outputs.
        A pre-quantized checkpoint's modules load in its format (`weights.checkpoint_format`); dense
        ones take the load-time `weights.quantizer` format when `quantize` (the default).

        Tensor parallelism: `rows` (column-parallel: per part, the ranges of its output rows this rank
        loads, `out_splits` then being the local sizes) or `cols` (row-parallel: the range of input
        columns; the output is summed over the ranks unless `reduce` is False, where the caller sums).
        """
        parts: list[torch.Tensor | WeightFormat] = []
        biases = []
        for i, prefix in enumerate(prefixes):
            shape = shapes[i] if shapes is not None else None
            part = None
            if weights.checkpoint_format is not None:
                part = weights.checkpoint_format.load(
                    weights, prefix, shape, required=quantize, rows=rows[i] if rows is not None else None, cols=cols
                )
            if part is None:
                expect = shape[::-1] if shape is not None and transposed else shape
                if rows is not None:  # output rows: dim 0 as stored, dim 1 of a Conv1D [in, out]
                    w = weights.get_ranges(f"{prefix}.weight", 1 if transposed else 0, rows[i], expect)
                elif cols is not None:
                    w = weights.get_ranges(f"{prefix}.weight", 0 if transposed else 1, (cols,), expect)
                else:
                    w = weights.get(f"{prefix}.weight", expect)
                part = w.t().contiguous() if transposed else w
            parts.append(part)
            if bias and rows is not None:
                full = (shape[0],) if shape is not None else None
                biases.append(weights.get_ranges(f"{prefix}.bias", 0, rows[i], full))
            elif bias:
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
        if rows is not None or cols is not None:
            full_sizes = tuple(s[0] for s in shapes) if shapes is not None else tuple(sizes)
            full_in = shapes[0][1] if shapes is not None else linear.in_features
            linear.shard = LinearShard(full_in, full_sizes, tuple(rows) if rows is not None else None, cols)
            if cols is not None and reduce:
                linear.reduce = weights.tp
        if quantize:
            linear.quantize(weights.quantizer)
        return linear


def _out_features(weight: torch.Tensor | WeightFormat) -> int:
    return weight.shape[0] if isinstance(weight, torch.Tensor) else weight.out_features
