"""Medusa heads in LoRAX's adapter format: extra heads that guess, from a position's final hidden
state, the tokens 2, 3, ... places after it (the model's own head gives the next one). They only
propose drafts for speculative decoding: what the model outputs never depends on them.

An adapter directory holds `config.json` with `medusa_num_heads` and `medusa_num_layers`, and the
heads' weights in `medusa_lm_head.safetensors` (or another `.safetensors` file beside
`adapter_model.safetensors`, when the directory also holds a LoRA adapter). Head i is
`medusa_num_layers` residual blocks x + silu(W x + b) (`{i}.{j}.linear.weight` / `.bias`), then its own
vocabulary projection `{i}.{layers}.weight` (version 1), or the base model's LM head when the file has
none (version 2, which LoRAX also loads per request).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

MEDUSA_CONFIG = "config.json"
MEDUSA_WEIGHTS = "medusa_lm_head.safetensors"


class MedusaError(ValueError):
    """The Medusa heads do not fit the base model, or their files are malformed."""


@dataclass
class MedusaHeads:
    weights: torch.Tensor  # [heads, layers, hidden, hidden]: block j of head i is weights[i, j]
    biases: torch.Tensor  # [heads, layers, hidden]
    out: torch.Tensor | None  # [heads, vocab, hidden]: version 1's own projections; None: the LM head

    @property
    def num_heads(self) -> int:
        return self.weights.shape[0]

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes + self.biases.nbytes + (self.out.nbytes if self.out is not None else 0)

    def to(self, device: torch.device) -> MedusaHeads:
        out = self.out.to(device) if self.out is not None else None
        return MedusaHeads(self.weights.to(device), self.biases.to(device), out)

    def propose(self, hidden: torch.Tensor, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Each head's most likely token for final hidden states [n, hidden]: [n, heads] int64.
        `logits_of` is the base model's LM head (version 2 heads end in it)."""
        x = hidden.to(self.weights.dtype)[:, None, :].expand(-1, self.num_heads, -1)  # [n, heads, hidden]
        for j in range(self.weights.shape[1]):
            x = x + F.silu(torch.einsum("nkh,kgh->nkg", x, self.weights[:, j]) + self.biases[:, j])
        if self.out is not None:
            return torch.einsum("nkh,kvh->nkv", x, self.out).argmax(-1)
        n, heads, size = x.shape
        return logits_of(x.reshape(n * heads, size)).argmax(-1).view(n, heads)


def medusa_config(adapter_dir: Path) -> dict | None:
    """The directory's Medusa config, or None when it holds no Medusa heads."""
    path = Path(adapter_dir) / MEDUSA_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MedusaError(f"{MEDUSA_CONFIG} is not valid JSON: {e}") from e
    return config if isinstance(config, dict) and "medusa_num_heads" in config else None


def _weights_file(adapter_dir: Path) -> Path:
    preferred = Path(adapter_dir) / MEDUSA_WEIGHTS
    if preferred.is_file():
        return preferred
    others = sorted(p for p in Path(adapter_dir).glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if len(others) != 1:
        raise MedusaError(f"Medusa adapter without its weights: expected {MEDUSA_WEIGHTS} in {adapter_dir}")
    return others[0]


def load_medusa(adapter_dir: Path, hidden_size: int, vocab_size: int, dtype: torch.dtype) -> MedusaHeads | None:
    """The directory's Medusa heads on the host (in `dtype`), checked against the base model's sizes;
    None when it has none."""
    config = medusa_config(adapter_dir)
    if config is None:
        return None
    heads, layers = config.get("medusa_num_heads"), config.get("medusa_num_layers", 1)
    if not isinstance(heads, int) or not isinstance(layers, int) or heads < 1 or layers < 1:
        raise MedusaError(f"medusa_num_heads and medusa_num_layers must be positive integers, got {heads}, {layers}")
    try:
        with safe_open(str(_weights_file(adapter_dir)), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise MedusaError(f"the Medusa weights are not a valid safetensors file: {e}") from e

    def tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in tensors:
            raise MedusaError(f"Medusa weights lack {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise MedusaError(f"{key} has shape {tuple(tensors[key].shape)}, the base model needs {shape}")
        return tensors[key].to(dtype)

    size = (hidden_size, hidden_size)
    weights = [[tensor(f"{i}.{j}.linear.weight", size) for j in range(layers)] for i in range(heads)]
    biases = [[tensor(f"{i}.{j}.linear.bias", (hidden_size,)) for j in range(layers)] for i in range(heads)]
    own = [f"{i}.{layers}.weight" in tensors for i in range(heads)]
    if any(own) and not all(own):
        raise MedusaError("some Medusa heads have their own vocabulary projection and some do not")
    out = None
    if all(own):
        out = torch.stack([tensor(f"{i}.{layers}.weight", (vocab_size, hidden_size)) for i in range(heads)])
    stacked = torch.stack([torch.stack(w) for w in weights]), torch.stack([torch.stack(b) for b in biases])
    return MedusaHeads(*stacked, out)
