"""The subset of a Hugging Face `config.json` the shared layers need, read once into one typed object."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layers.rotary import RopeConfig


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters shared by every decoder-only family."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    rope: RopeConfig
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" | "full_attention"
    attention_bias: bool = False
    mlp_bias: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power when set
    logit_scale: float | None = None  # logits are multiplied by it (Cohere)
    use_qk_norm: bool = False
    scale_attn_weights: bool = True  # GPT-2: False leaves q·k unscaled
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2: layer i's scores are also divided by i + 1
    residual_post_norm: bool = False  # Bloom's apply_residual_connection_post_layernorm
    num_experts: int = 0
    experts_per_token: int = 0
    moe_norm_p: float | None = 1.0  # top-k routing weights are divided by their p-norm; None: kept as is
    clip_qkv: float | None = None  # q/k/v activations clamped to [-clip, clip] (DBRX)
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_cfg: dict[str, Any] | None = None) -> ModelConfig:
        cfg = _with_aliases(_family_keys(cfg))
        archs = cfg.get("architectures") or []
        missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        sliding = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:  # Qwen2 keeps the field but may switch it off
            sliding = None
        return cls(
            architecture=archs[0] if archs else "",
            model_type=cfg.get("model_type", ""),
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", 4 * hidden),
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-6)),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope=RopeConfig.from_hf(cfg),
            sliding_window=int(sliding) if sliding else None,
            layer_types=tuple(cfg["layer_types"]) if cfg.get("layer_types") else None,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            attn_logit_softcap=cfg.get("attn_logit_softcapping"),
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
            logit_scale=cfg.get("logit_scale"),
            use_qk_norm=bool(cfg.get("use_qk_norm", False)),
            scale_attn_weights=bool(cfg.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
            residual_post_norm=bool(cfg.get("apply_residual_connection_post_layernorm", False)),
            num_experts=int(cfg.get("num_local_experts") or 0),
            experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
            moe_norm_p=cfg.get("moe_norm_p", 1.0),
            clip_qkv=cfg.get("clip_qkv"),
            eos_token_ids=_eos_ids(cfg, generation_cfg or {}),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=cfg,
        )

    def window_for(self, layer: int) -> int | None:
        """The sliding attention window of one layer (None: full attention)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json")
        cfg = json.loads(config_path.read_text())
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_hf(cfg, gen)


# GPT-2 / Bloom config.json names → the names read above; a name already present wins.
_ALIASES = {
    "hidden_size": ("n_embd", "n_embed"),
    "num_attention_heads": ("n_head",),
    "num_hidden_layers": ("n_layer",),
    "intermediate_size": ("n_inner",),  # GPT-2's None means 4 * hidden
    "max_position_embeddings": ("n_positions",),
    "layer_norm_eps": ("layer_norm_epsilon",),
    "hidden_act": ("activation_function",),
}


def _with_aliases(cfg: dict[str, Any]) -> dict[str, Any]:
    out = dict(cfg)
    for name, aliases in _ALIASES.items():
        for alias in aliases:
            if out.get(name) is None and cfg.get(alias) is not None:
                out[name] = cfg[alias]
    return out


def _family_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a family's own config.json vocabulary (by `model_type`) into the names read above."""
    rewrite = _FAMILY_KEYS.get(cfg.get("model_type", ""))
    return rewrite(cfg) if rewrite else cfg


def _qwen_v1_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen (v1, remote code). Its `intermediate_size` counts w1 and w2 together. Dynamic NTK and logn
    attention only act beyond `seq_length`, so the context is capped there (max_position_embeddings
    names the NTK-extended length, which we do not implement)."""
    if cfg.get("no_bias") is False:
        raise ValueError("Qwen configs with no_bias=false are not supported (published ones have no_bias=true)")
    if "intermediate_size" not in cfg:
        raise ValueError("config.json lacks intermediate_size")
    dtype = next((name for flag, name in _QWEN_DTYPE_FLAGS if cfg.get(flag)), None)
    return {
        **cfg,
        "intermediate_size": cfg["intermediate_size"] // 2,
        "num_key_value_heads": cfg.get("num_attention_heads"),  # no grouped-query attention
        "head_dim": cfg.get("kv_channels"),
        "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-6),
        "rope_theta": cfg.get("rotary_emb_base", 10000.0),
        "partial_rotary_factor": cfg.get("rotary_pct", 1.0),
        "max_position_embeddings": cfg.get("seq_length") or cfg.get("max_position_embeddings", 2048),
        "hidden_act": "silu",
        "torch_dtype": cfg.get("torch_dtype") or dtype,
    }


_QWEN_DTYPE_FLAGS = (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"))


def _dbrx_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """DBRX: MPT-style names with attention and MoE settings nested in attn_config / ffn_config.
    RoPE theta lives in attn_config unless the config has transformers-5 `rope_parameters`."""
    attn, ffn = cfg.get("attn_config") or {}, cfg.get("ffn_config") or {}
    renamed = {"d_model": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers"}
    out = {
        **cfg,
        **{ours: cfg[theirs] for theirs, ours in renamed.items() if theirs in cfg},
        "max_position_embeddings": cfg.get("max_seq_len", 2048),
        "num_key_value_heads": attn.get("kv_n_heads", 1),
        "clip_qkv": attn.get("clip_qkv"),
        "intermediate_size": ffn.get("ffn_hidden_size", 3584),
        "num_local_experts": ffn.get("moe_num_experts", 4),
        "num_experts_per_tok": ffn.get("moe_top_k", 1),
        "moe_norm_p": ffn.get("moe_normalize_expert_weights", 1.0),
        "hidden_act": (ffn.get("ffn_act_fn") or {}).get("name", "silu"),
        "layer_norm_eps": 1e-5,  # torch's LayerNorm default; DBRX configs do not name it
    }
    if not cfg.get("rope_parameters") and "rope_theta" not in cfg:
        out["rope_theta"] = attn.get("rope_theta", 10000.0)
    return out


_FAMILY_KEYS = {"qwen": _qwen_v1_keys, "dbrx": _dbrx_keys}


def _eos_ids(cfg: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    """Every end-of-sequence id named by config.json and generation_config.json."""
    ids: list[int] = []
    for source in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
        if source is None:
            continue
        for token in source if isinstance(source, list) else [source]:
            if token not in ids:
                ids.append(int(token))
    return tuple(ids)
