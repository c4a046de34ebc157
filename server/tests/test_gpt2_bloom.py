"""GPT-2 and Bloom details the architecture parity tests do not reach: ALiBi slopes, their config.json
vocabulary, and checkpoints saved from the bare base model (no `transformer.` prefix)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import make_model
from transformers import AutoModelForCausalLM
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from lorax_server.forward import ForwardBatch
from lorax_server.kv_cache import KVCache
from lorax_server.layers.attention import TorchAttention, alibi_slopes
from lorax_server.models.config import ModelConfig
from lorax_server.models.loader import load_model


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 32, 40, 112])
def test_alibi_slopes_equal_bloom(heads: int) -> None:
    assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))


def test_gpt2_config_names() -> None:
    cfg = ModelConfig.from_hf(
        {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": 50257,
            "n_embd": 768,
            "n_head": 12,
            "n_layer": 12,
            "n_inner": None,
            "n_positions": 1024,
            "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new",
            "scale_attn_by_inverse_layer_idx": True,
        }
    )
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (768, 12, 12, 12)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.head_dim) == (3072, 1024, 64)
    assert (cfg.norm_eps, cfg.hidden_act) == (1e-5, "gelu_new")
    assert cfg.scale_attn_weights and cfg.scale_attn_by_inverse_layer_idx


def test_bloom_config_names() -> None:
    cfg = ModelConfig.from_hf(
        {
            "architectures": ["BloomForCausalLM"],
            "model_type": "bloom",
            "vocab_size": 250880,
            "n_embed": 1024,  # early Bloom configs
            "n_head": 16,
            "n_layer": 24,
            "layer_norm_epsilon": 1e-5,
            "apply_residual_connection_post_layernorm": False,
        }
    )
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.intermediate_size) == (1024, 16, 24, 4096)
    assert cfg.norm_eps == 1e-5 and not cfg.residual_post_norm


@pytest.mark.parametrize(
    "config_name, model_name", [("GPT2Config", "GPT2LMHeadModel"), ("BloomConfig", "BloomForCausalLM")]
)
def test_checkpoint_without_base_prefix_loads(tmp_path: Path, config_name: str, model_name: str) -> None:
    """Published GPT-2 / Bloom checkpoints name `h.0...`, not `transformer.h.0...` (GPT-2's also keeps
    its causal-mask buffer `attn.bias`)."""
    base = make_model(getattr(transformers, config_name), getattr(transformers, model_name), tmp_path / "base")
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(base / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    (bare / "model.safetensors").unlink()
    save_file(tensors, bare / "model.safetensors")

    ours = load_model(bare, TorchAttention(4), torch.device("cpu"), "float32")
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.arange(3, 14)
    c = ours.config
    cache = KVCache(c.num_layers, 8, 4, c.num_kv_heads, c.head_dim, torch.float32, torch.device("cpu"))
    meta = ForwardBatch.build(ids, [len(ids)], [len(ids)], torch.tensor([[0, 1, 2]]), 4, torch.arange(len(ids)))
    with torch.no_grad():
        assert (ours.forward(meta, cache) - ref(ids[None]).logits[0]).abs().max() < 1e-4


def test_sequence_longer_than_learned_positions_is_refused(tmp_path: Path) -> None:
    base = make_model(transformers.GPT2Config, transformers.GPT2LMHeadModel, tmp_path, max_position_embeddings=8)
    ours = load_model(base, TorchAttention(4), torch.device("cpu"), "float32")
    c = ours.config
    cache = KVCache(c.num_layers, 8, 4, c.num_kv_heads, c.head_dim, torch.float32, torch.device("cpu"))
    ids = torch.arange(3, 12)
    meta = ForwardBatch.build(ids, [len(ids)], [len(ids)], torch.tensor([[0, 1, 2]]), 4)
    with pytest.raises(ValueError, match="longer than the model's 8 learned positions"):
        ours.forward(meta, cache)
