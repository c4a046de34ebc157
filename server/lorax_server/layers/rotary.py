"""Rotary position embeddings: default, linear, dynamic-NTK, llama3, yarn and longrope frequencies.

Frequencies follow the published formulas (and transformers' choices of defaults) so that logits match
transformers to float32 precision. Length-dependent variants (dynamic, longrope) pick their frequencies
per token from the length of the token's own sequence, so a sequence's result never depends on which
other sequences share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import fused_cpu


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters, normalised from either transformers config style."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic | llama3 | yarn | longrope
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn / longrope
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> RopeConfig:
        """Accept transformers-5 `rope_parameters` and transformers-4 `rope_theta` + `rope_scaling`."""
        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        if not params:
            params = dict(scaling)
            params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type == "su":  # Phi-3's early name for longrope
            rope_type = "longrope"
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))

        def opt_tuple(key: str) -> tuple[float, ...] | None:
            return tuple(params[key]) if params.get(key) is not None else None

        return cls(
            theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            factor=float(params.get("factor") or 1.0),
            partial_rotary_factor=float(partial),
            original_max_position_embeddings=params.get(
                "original_max_position_embeddings", cfg.get("original_max_position_embeddings")
            ),
            low_freq_factor=params.get("low_freq_factor"),
            high_freq_factor=params.get("high_freq_factor"),
            beta_fast=params.get("beta_fast"),
            beta_slow=params.get("beta_slow"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
            short_factor=opt_tuple("short_factor"),
            long_factor=opt_tuple("long_factor"),
        )


def base_inv_freq(theta: float | torch.Tensor, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """`1 / theta^(2i/dim)`; with a tensor theta of shape [n, 1] the result is [n, dim/2]."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    original = rope.original_max_position_embeddings or max_positions

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """Computes `(cos, sin)` for the rotary part of each head, once per forward pass."""

    def __init__(
        self,
        rope: RopeConfig,
        head_dim: int,
        max_positions: int,
        device: torch.device,
        interleaved: bool = False,
    ) -> None:
        self.rope = rope
        self.dim = int(head_dim * rope.partial_rotary_factor)
        self.max_positions = max_positions
        self.interleaved = interleaved  # GPT-J pairing (x0,x1),(x2,x3) instead of halves
        self.attention_scaling = 1.0
        # Longrope switches frequencies once a sequence outgrows the original context; the keys cached
        # before then were rotated with the short factors and must be recomputed at that length.
        self.recompute_at_length: int | None = None
        # Above this sequence length the frequencies depend on the length itself (dynamic NTK, longrope):
        # a prompt's keys then depend on the whole prompt's length, not only on the tokens before them.
        self.length_dependent_above: int | None = max_positions if rope.rope_type == "dynamic" else None
        inv_freq = base_inv_freq(rope.theta, self.dim)
        if rope.rope_type == "linear":
            inv_freq = inv_freq / rope.factor
        elif rope.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(rope, inv_freq)
        elif rope.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(rope, self.dim, max_positions)
        elif rope.rope_type == "longrope":
            original = rope.original_max_position_embeddings or max_positions
            scale = max_positions / original
            self.attention_scaling = (
                rope.attention_factor
                if rope.attention_factor is not None
                else (1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original)))
            )
            exps = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            self.short_inv_freq = (1.0 / (torch.tensor(rope.short_factor) * rope.theta**exps)).to(device)
            self.long_inv_freq = (1.0 / (torch.tensor(rope.long_factor) * rope.theta**exps)).to(device)
            self.original_max_positions = original
            if rope.short_factor != rope.long_factor:
                self.recompute_at_length = original + 1
                self.length_dependent_above = original
        elif rope.rope_type not in ("default", "dynamic"):
            raise ValueError(f"unsupported rope type {rope.rope_type!r}")
        self.inv_freq = inv_freq.to(device)  # [dim / 2]

    def cos_sin(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens]; seq_lens: [num_tokens] length of each token's sequence at this step.

        Returns cos, sin: [num_tokens, dim] laid out to multiply the query/key rotary slice directly.
        """
        inv_freq = self._inv_freq_per_token(seq_lens)  # [dim/2] or [num_tokens, dim/2]
        freqs = positions.float().unsqueeze(-1) * inv_freq  # [num_tokens, dim/2]
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def _inv_freq_per_token(self, seq_lens: torch.Tensor | None) -> torch.Tensor:
        rope = self.rope
        if rope.rope_type == "dynamic" and seq_lens is not None:
            length = seq_lens.clamp(min=self.max_positions).float().unsqueeze(-1)  # [num_tokens, 1]
            theta = rope.theta * ((rope.factor * length / self.max_positions) - (rope.factor - 1)) ** (
                self.dim / (self.dim - 2)
            )
            return base_inv_freq(theta, self.dim, seq_lens.device)
        if rope.rope_type == "longrope":
            if seq_lens is None:
                return self.short_inv_freq
            use_long = (seq_lens > self.original_max_positions).unsqueeze(-1)  # [num_tokens, 1]
            return torch.where(use_long, self.long_inv_freq, self.short_inv_freq)
        return self.inv_freq


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos/sin: [num_tokens, rot_dim]. Rotates the first rot_dim dims."""
    if fused_cpu.rotary_applies(x, cos, sin):
        return fused_cpu.rotary(x, cos, sin, interleaved)
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if interleaved:
        pairs = x_rot.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        half = rot_dim // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.numel() else out
