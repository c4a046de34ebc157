"""config.json vocabularies of families that name things their own way (Qwen v1, DBRX), as published."""

from __future__ import annotations

import pytest

from lorax_server.models.config import ModelConfig

QWEN_7B = {  # the shape of Qwen/Qwen-7B's config.json (remote code)
    "architectures": ["QWenLMHeadModel"],
    "model_type": "qwen",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "kv_channels": 128,
    "intermediate_size": 22016,
    "layer_norm_epsilon": 1e-06,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "seq_length": 2048,
    "max_position_embeddings": 8192,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "no_bias": True,
    "tie_word_embeddings": False,
    "bf16": True,
    "fp16": False,
    "fp32": False,
}

DBRX_HUB = {  # the shape of databricks/dbrx-instruct's config.json (no rope_parameters)
    "architectures": ["DbrxForCausalLM"],
    "model_type": "dbrx",
    "d_model": 6144,
    "n_heads": 48,
    "n_layers": 40,
    "max_seq_len": 32768,
    "vocab_size": 100352,
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "rope_theta": 500000},
    "ffn_config": {
        "ffn_act_fn": {"name": "silu"},
        "ffn_hidden_size": 10752,
        "moe_num_experts": 16,
        "moe_top_k": 4,
        "moe_normalize_expert_weights": 1,
    },
}


def test_qwen_v1_names() -> None:
    c = ModelConfig.from_hf(QWEN_7B)
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (4096, 32, 32, 128)
    assert c.intermediate_size == 11008  # w1 and w2 are each half of Qwen's intermediate_size
    assert (c.norm_eps, c.rope.theta, c.rope.partial_rotary_factor, c.hidden_act) == (1e-6, 10000, 1.0, "silu")
    assert c.torch_dtype == "bfloat16"
    # Beyond seq_length Qwen needs dynamic NTK + logn attention, which we do not implement.
    assert c.max_position_embeddings == 2048


def test_qwen_v1_partial_rotary_and_refusals() -> None:
    assert ModelConfig.from_hf({**QWEN_7B, "rotary_pct": 0.5}).rope.partial_rotary_factor == 0.5
    with pytest.raises(ValueError, match="no_bias=false"):
        ModelConfig.from_hf({**QWEN_7B, "no_bias": False})


def test_dbrx_names() -> None:
    c = ModelConfig.from_hf(DBRX_HUB)
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (6144, 48, 8, 128, 40)
    assert (c.num_experts, c.experts_per_token, c.intermediate_size, c.moe_norm_p) == (16, 4, 10752, 1)
    assert (c.clip_qkv, c.max_position_embeddings, c.norm_eps, c.hidden_act) == (8, 32768, 1e-5, "silu")
    assert c.rope.theta == 500000  # from attn_config


def test_dbrx_rope_parameters_win_and_normalisation_can_be_off() -> None:
    """transformers 5 saves `rope_parameters` (and runs with them, ignoring attn_config.rope_theta)."""
    cfg = {**DBRX_HUB, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    cfg["ffn_config"] = {**DBRX_HUB["ffn_config"], "moe_normalize_expert_weights": None}
    c = ModelConfig.from_hf(cfg)
    assert (c.rope.theta, c.moe_norm_p) == (10000.0, None)
