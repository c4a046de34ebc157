"""From the encoder's hidden states to one vector per input, as the model's sentence-transformers modules say.

A model directory with a `modules.json` lists its modules in order: the transformer (the encoder, at
the directory's root), then a `Pooling` module and any `Dense` and `Normalize` modules. Pooling's
`config.json` names its modes, in sentence-transformers' current form (`pooling_mode`: one mode or a
list, concatenated in that order) or its older one (`pooling_mode_*` flags, concatenated as cls, max,
mean, mean_sqrt_len_tokens, weightedmean, lasttoken). A Dense module is `act(W x + b)` (plus a residual
where `use_residual` is set); Normalize divides by the L2 norm. Without `modules.json`: the first
(CLS) token's final hidden state, unnormalized. Any other module is refused at load, not ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .model import EncoderBatch

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' older flags, in the order it concatenates the modes they switch on.
_LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense modules' `activation_function` (a torch.nn class path), by class name.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "ReLU": F.relu,
    "GELU": F.gelu,
    "Sigmoid": torch.sigmoid,
    "SiLU": F.silu,
}


class PoolingError(ValueError):
    """The model's sentence-transformers modules cannot be served as they are; the message says why."""


def pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """The modes a Pooling module's config.json switches on, in concatenation order (mean by default)."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for flag, m in _LEGACY_FLAGS.items() if config.get(flag)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise PoolingError(f"unknown pooling mode(s) {unknown}; known: {', '.join(POOLING_MODES)}")
    return modes


def pool(hidden: torch.Tensor, batch: EncoderBatch, modes: tuple[str, ...]) -> torch.Tensor:
    """hidden [num_tokens, dim] → [batch, len(modes) * dim], each mode's vector over every token of an input."""
    lengths = batch.lengths.to(hidden.dtype)[:, None]  # [batch, 1]
    sums: torch.Tensor | None = None
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden.index_select(0, batch.starts))
        elif mode == "lasttoken":
            out.append(hidden.index_select(0, batch.starts + batch.lengths - 1))
        elif mode == "max":
            best = hidden.new_full((batch.size, hidden.shape[1]), float("-inf"))
            index = batch.seq_index[:, None].expand_as(hidden)
            out.append(best.scatter_reduce(0, index, hidden, reduce="amax"))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if sums is None:
                sums = hidden.new_zeros(batch.size, hidden.shape[1]).index_add_(0, batch.seq_index, hidden)
            out.append(sums / (lengths if mode == "mean" else lengths.sqrt()))
        else:  # weightedmean: token i of an input (from 1) weighs i
            weights = (batch.offsets + 1).to(hidden.dtype)[:, None]  # [num_tokens, 1]
            total = hidden.new_zeros(batch.size, hidden.shape[1]).index_add_(0, batch.seq_index, hidden * weights)
            out.append(total / (lengths * (lengths + 1) / 2))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


class Dense:
    """sentence-transformers' Dense module: `act(x W^T + b)`, plus x (or its projection) with a residual."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        act: Callable[[torch.Tensor], torch.Tensor],
        residual: torch.Tensor | None = None,
        use_residual: bool = False,
    ) -> None:
        self.weight = weight  # [out_features, in_features]
        self.bias = bias  # [out_features] or None
        self.act = act
        self.residual = residual  # [out_features, in_features] where the residual is projected, else None
        self.use_residual = use_residual

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, in_features] → [batch, out_features]."""
        y = self.act(F.linear(x, self.weight, self.bias))
        if self.use_residual:
            y = y + (x if self.residual is None else F.linear(x, self.residual))
        return y

    @classmethod
    def load(cls, folder: Path, in_features: int, device: torch.device, dtype: torch.dtype) -> Dense:
        config = json.loads((folder / "config.json").read_text())
        if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
            raise PoolingError(f"{folder.name}: a Dense module over {config['module_input_name']} is not supported")
        if config.get("in_features") != in_features:
            got = config.get("in_features")
            raise PoolingError(f"{folder.name}: in_features is {got}, but its input has {in_features} values")
        out_features = int(config["out_features"])
        name = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
        if name not in _ACTIVATIONS:
            raise PoolingError(f"{folder.name}: activation {config['activation_function']!r} is not supported")
        tensors = {k: v.to(device, dtype) for k, v in _module_tensors(folder).items()}
        weight = tensors.get("linear.weight")
        if weight is None or tuple(weight.shape) != (out_features, in_features):
            raise PoolingError(f"{folder.name}: linear.weight is missing or not [{out_features}, {in_features}]")
        use_residual = bool(config.get("use_residual", False))
        residual = tensors.get("residual.weight") if use_residual and in_features != out_features else None
        if use_residual and in_features != out_features and residual is None:
            raise PoolingError(f"{folder.name}: residual.weight is missing")
        bias = tensors.get("linear.bias") if config.get("bias", True) else None
        return cls(weight, bias, _ACTIVATIONS[name], residual, use_residual)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1)


class EmbeddingHead:
    """Pooling, then the Dense and Normalize steps in the model's order. `dim`: the vectors' length;
    `max_length`: sentence-transformers' `max_seq_length` where the model sets one (it truncates there)."""

    def __init__(
        self,
        modes: tuple[str, ...],
        steps: list[Callable[[torch.Tensor], torch.Tensor]],
        dim: int,
        max_length: int | None = None,
    ) -> None:
        self.modes = modes
        self.steps = steps
        self.dim = dim
        self.max_length = max_length

    def __call__(self, hidden: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        """hidden [num_tokens, hidden] → [batch, dim]."""
        x = pool(hidden, batch, self.modes)
        for step in self.steps:
            x = step(x)
        return x


def load_embedding_head(model_dir: str | Path, hidden: int, device: torch.device, dtype: torch.dtype) -> EmbeddingHead:
    """The model's sentence-transformers modules after the encoder, or CLS pooling without a modules.json.
    PoolingError for a layout that cannot be served exactly."""
    model_dir = Path(model_dir)
    listing = model_dir / "modules.json"
    if not listing.is_file():
        return EmbeddingHead(("cls",), [], hidden)
    modules = sorted(json.loads(listing.read_text()), key=lambda m: int(m.get("idx", 0)))
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"]:
        raise PoolingError(f"modules.json must start with Transformer and Pooling modules, not {kinds[:2]}")
    if modules[0].get("path", "") not in ("", "."):
        raise PoolingError(f"the model's transformer lives in {modules[0]['path']}/: serve that directory's layout")
    pooling = json.loads((model_dir / modules[1]["path"] / "config.json").read_text())
    width = pooling.get("embedding_dimension", pooling.get("word_embedding_dimension", hidden))
    if width != hidden:
        raise PoolingError(f"the Pooling module takes {width} features, the encoder gives {hidden}")
    modes = pooling_modes(pooling)
    dim = len(modes) * hidden
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for module, kind in zip(modules[2:], kinds[2:], strict=True):
        if kind == "Dense":
            dense = Dense.load(model_dir / module["path"], dim, device, dtype)
            steps.append(dense)
            dim = dense.weight.shape[0]
        elif kind == "Normalize":
            steps.append(_normalize)
        else:
            raise PoolingError(f"sentence-transformers module {module.get('type')!r} is not supported")
    return EmbeddingHead(modes, steps, dim, _max_seq_length(model_dir))


def _max_seq_length(model_dir: Path) -> int | None:
    """`max_seq_length` of sentence_bert_config.json (the transformer module's), when it sets one."""
    path = model_dir / "sentence_bert_config.json"
    length = json.loads(path.read_text()).get("max_seq_length") if path.is_file() else None
    return int(length) if length else None


def _module_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A module's weights: model.safetensors, else pytorch_model.bin read as plain tensors only."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise PoolingError(f"{folder.name} has no weights (model.safetensors or pytorch_model.bin)")
