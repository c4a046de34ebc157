"""Tiny random models of every natively supported family, shared by the parity tests (server/tests) and
the HTTP tests (integration-tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import make_model

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# family → (config class, model class, config overrides, [adapter A targets, adapter B targets])
FAMILIES = {
    "dbrx": (  # d_model, not hidden_size: DbrxConfig sizes its experts from d_model; clip_qkv low enough to bite
        "DbrxConfig",
        "DbrxForCausalLM",
        {
            "d_model": 64,
            "attn_config": {"kv_n_heads": 2, "clip_qkv": 0.1, "rope_theta": 10000.0},
            "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2},
        },
        [["Wqkv"], ["Wqkv", "out_proj"]],
    ),
    "dbrx_top3_l2": (  # routing weights divided by their 2-norm; clip_qkv None crashes transformers
        "DbrxConfig",
        "DbrxForCausalLM",
        {
            "d_model": 64,
            "attn_config": {"kv_n_heads": 4, "clip_qkv": 100.0, "rope_theta": 10000.0},
            "ffn_config": {
                "ffn_hidden_size": 48,
                "moe_num_experts": 4,
                "moe_top_k": 3,
                "moe_normalize_expert_weights": 2.0,
            },
        },
        [["out_proj"], ["Wqkv"]],
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        {"num_key_value_heads": 4, "partial_rotary_factor": 0.5},
        [["q_proj", "dense"], ["fc1", "fc2", "v_proj"]],
    ),  # fmt: skip
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
        [["q_proj", "v_proj"], ATTN],
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}, [ATTN, MLP]),
    "cohere_qk_norm": ("CohereConfig", "CohereForCausalLM", {"use_qk_norm": True}, [["q_proj", "k_proj"], ATTN + MLP]),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {"pad_token_id": 0},
        [["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj", "qkv_proj"]],
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, [ATTN, MLP]),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}, [ATTN, MLP]),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, [["q_proj", "v_proj"], ATTN + MLP]),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 32}, [ATTN, ["gate_proj", "down_proj"]]),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # window < prompt length; soft caps low enough to bite on random weights
        {
            "head_dim": 32,
            "sliding_window": 4,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
            "query_pre_attn_scalar": 24,
        },  # fmt: skip
        [["q_proj", "o_proj", "up_proj"], ATTN + MLP],
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}, [["c_attn", "c_proj"], ["c_fc", "c_proj", "c_attn"]]),
    "gpt2_layer_scaled": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True, "n_inner": 96},
        [["c_attn"], ["c_fc", "c_proj"]],
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {},
        [["query_key_value", "dense"], ["dense_h_to_4h", "dense_4h_to_h", "query_key_value"]],
    ),
    "bloom_post_ln_6_heads": (  # 6 heads: ALiBi slopes of a non-power-of-two head count
        "BloomConfig",
        "BloomForCausalLM",
        {"apply_residual_connection_post_layernorm": True, "hidden_size": 96, "num_attention_heads": 6},
        [["query_key_value"], ["dense", "dense_4h_to_h"]],
    ),
}
# Extra peft LoraConfig arguments by model class (GPT-2's Conv1D layers take fan_in_fan_out adapters).
LORA_KWARGS = {"GPT2LMHeadModel": {"fan_in_fan_out": True}}

SEQ_LENGTH = 160  # the Qwen v1 checkpoint's context: above the HTTP tests' --max-total-tokens 128


def build_family(name: str, out_dir: Path) -> tuple[Path, Path]:
    """A tiny random model of family `name` (a FAMILIES key, or "qwen_v1") saved with its tokenizer.
    Returns (checkpoint to serve, checkpoint transformers runs as the reference): they differ only for
    Qwen v1, which transformers cannot load and which is tested as a renamed Qwen2."""
    if name == "qwen_v1":
        qwen2 = make_model(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, out_dir / "qwen2",
                           num_key_value_heads=4, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "default", "rope_theta": 20000.0})  # fmt: skip
        return qwen_v1_checkpoint(qwen2, out_dir / "qwen"), qwen2
    config_name, model_name, overrides, _targets = FAMILIES[name]
    model_dir = make_model(getattr(transformers, config_name), getattr(transformers, model_name), out_dir, **overrides)
    return model_dir, model_dir


# Qwen2 module → Qwen v1 module, inside a layer (Qwen v1's MLP is c_proj(w1(x) * silu(w2(x))).
RENAMES = {
    "self_attn.o_proj": "attn.c_proj",
    "mlp.gate_proj": "mlp.w2",
    "mlp.up_proj": "mlp.w1",
    "mlp.down_proj": "mlp.c_proj",
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
}
QKV = ("q_proj", "k_proj", "v_proj")


def qwen_v1_checkpoint(src: Path, dst: Path) -> Path:
    """The Qwen2 checkpoint `src` as a Qwen (v1) checkpoint in `dst`."""
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    out = {
        "transformer.wte.weight": state["model.embed_tokens.weight"],
        "transformer.ln_f.weight": state["model.norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        old, new = f"model.layers.{i}", f"transformer.h.{i}"
        out.update({f"{new}.{b}.weight": state[f"{old}.{a}.weight"] for a, b in RENAMES.items()})
        for kind in ("weight", "bias"):
            out[f"{new}.attn.c_attn.{kind}"] = torch.cat([state[f"{old}.self_attn.{p}.{kind}"] for p in QKV])
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    save_file(out, dst / "model.safetensors")
    heads = cfg["num_attention_heads"]
    qwen_cfg = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "num_attention_heads": heads,
        "num_hidden_layers": cfg["num_hidden_layers"],
        "kv_channels": cfg["hidden_size"] // heads,
        "intermediate_size": 2 * cfg["intermediate_size"],  # Qwen counts w1 and w2 together
        "layer_norm_epsilon": cfg["rms_norm_eps"],
        "rotary_emb_base": cfg["rope_parameters"]["rope_theta"],
        "rotary_pct": 1.0,
        "seq_length": SEQ_LENGTH,
        "max_position_embeddings": 8192,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "scale_attn_weights": True,
        "no_bias": True,
        "tie_word_embeddings": False,
        "bf16": False,
        "fp16": False,
        "fp32": False,
    }
    (dst / "config.json").write_text(json.dumps(qwen_cfg))
    return dst
