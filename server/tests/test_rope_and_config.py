"""Rope scaling variants, both config styles, tied embeddings: logits equal transformers', including
positions past the original context where the scaled variants differ from plain rope."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_llama
from transformers import AutoModelForCausalLM

from lorax_server.forward import ForwardBatch
from lorax_server.kv_cache import BlockManager, KVCache
from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.rotary import RopeConfig
from lorax_server.models.config import ModelConfig
from lorax_server.models.loader import load_model

BLOCK = 8
MAX_POS = 16  # short "original" context so the test sequences run past it
ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
        "rope_theta": 500000.0,
    },
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "rope_theta": 10000.0,
    },
}


@pytest.fixture(scope="module", params=sorted(ROPES))
def rope_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model_dir = make_llama(
        tmp_path_factory.mktemp(request.param),
        rope_parameters=ROPES[request.param],
        max_position_embeddings=MAX_POS,
    )
    ours = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return ours, ref


@torch.no_grad()
def test_scaled_rope_prefill_and_decode_match(rope_model) -> None:
    """Prefill 20 tokens (past MAX_POS) then decode 8 more; every logit equals transformers'."""
    ours, ref = rope_model
    prompt = torch.randint(3, ours.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    steps = 8
    c = ours.config
    cache = KVCache(c.num_layers, 16, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, torch.device("cpu"))
    table = torch.tensor([BlockManager(16, BLOCK).allocate(len(prompt) + steps)])
    n = len(prompt)
    meta = ForwardBatch.build(prompt, [n], [n], table, BLOCK, logits_index=torch.arange(n))
    got = [ours.forward(meta, cache)]
    want_prefill = ref(prompt[None]).logits[0]
    assert (got[0] - want_prefill).abs().max() < 1e-4
    out = ref.generate(
        prompt[None],
        attention_mask=torch.ones(1, n, dtype=torch.long),
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    generated = out.sequences[0, n:]
    for i in range(steps - 1):
        meta = ForwardBatch.build(generated[i : i + 1], [1], [n + i + 1], table, BLOCK)
        logits = ours.forward(meta, cache)[0]
        assert (logits - out.logits[i + 1][0]).abs().max() < 1e-4, f"decode step {i + 1}"


def test_transformers4_style_rope_keys_are_understood() -> None:
    cfg = {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}
    rope = RopeConfig.from_hf(cfg)
    assert (rope.theta, rope.rope_type, rope.factor) == (5e5, "linear", 4.0)
    v5 = RopeConfig.from_hf({"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}})
    assert v5 == rope
    assert RopeConfig.from_hf({}).rope_type == "default"


def test_transformers4_config_file_loads_with_parity(tmp_path: Path) -> None:
    """A config.json written in transformers-4 style (rope_theta + rope_scaling) gives the same logits."""
    model_dir = make_llama(tmp_path / "m", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    cfg = json.loads((model_dir / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_dir(model_dir).rope.rope_type == "linear"
    _assert_prefill_parity(model_dir)


def test_tied_embeddings(tmp_path: Path) -> None:
    model_dir = make_llama(tmp_path / "tied", tie_word_embeddings=True)
    assert ModelConfig.from_dir(model_dir).tie_word_embeddings
    _assert_prefill_parity(model_dir)


def test_eos_ids_merge_config_and_generation_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 10,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "eos_token_id": 2,
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (2, 7, 9)


@torch.no_grad()
def _assert_prefill_parity(model_dir: Path) -> None:
    ours = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(0))
    c = ours.config
    cache = KVCache(c.num_layers, 4, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, torch.device("cpu"))
    table = torch.tensor([[0, 1]])
    meta = ForwardBatch.build(prompt, [12], [12], table, BLOCK, logits_index=torch.arange(12))
    assert (ours.forward(meta, cache) - ref(prompt[None]).logits[0]).abs().max() < 1e-4
