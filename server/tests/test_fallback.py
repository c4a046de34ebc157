"""Architectures without a spec are served through transformers: batched, greedy-exact, no adapters."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import make_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine, RequestError
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.fallback import TransformersCausalLM, UnsupportedArchitecture
from lorax_server.models.loader import load_model
from lorax_server.sampling import SamplingParams

FAMILIES = {
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": None}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    config_name, model_name, overrides = FAMILIES[request.param]
    model_dir = make_model(
        getattr(transformers, config_name), getattr(transformers, model_name), tmp_path_factory.mktemp("m"), **overrides
    )
    model = load_model(model_dir, TorchAttention(4), torch.device("cpu"), "float32")
    assert isinstance(model, TransformersCausalLM) and not model.supports_adapters
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), CacheConfig(4, num_blocks=256))
    engine.warmup(32, 64, 64)
    return engine, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> list[int]:
    seq = torch.tensor([ids])
    for _ in range(n):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq[0, len(ids) :].tolist()


def test_ragged_batch_with_a_late_joiner_equals_transformers(served) -> None:
    engine, ref = served
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]
    requests = [RequestIn(i, p, SamplingParams(), 6 + i, ignore_eos=True) for i, p in enumerate(prompts)]
    tokens = {r.id: [] for r in requests}
    gens, a = engine.prefill(1, requests[:3])
    gens2, b = engine.prefill(2, requests[3:])
    for g_ in gens + gens2:
        tokens[g_.request_id].append(g_.token_id)
    batch = engine.decode([a.id, b.id])
    while True:
        gens, cached = batch
        for g_ in gens:
            tokens[g_.request_id].append(g_.token_id)
        if cached is None:
            break
        batch = engine.decode([cached.id])
    for r in requests:
        assert tokens[r.id] == greedy(ref, r.input_ids, r.max_new_tokens), r.id


def test_adapters_are_refused(served) -> None:
    engine, _ = served
    with pytest.raises(RequestError, match="takes no adapters"):
        engine.prefill(9, [RequestIn(1, [5, 6], SamplingParams(), 2, adapter_index=1)])


def test_unknown_class_needs_trust_remote_code(tmp_path) -> None:
    from tiny_models import make_llama

    model_dir = make_llama(tmp_path / "m")
    cfg = (model_dir / "config.json").read_text().replace("LlamaForCausalLM", "NotARealModelForCausalLM")
    (model_dir / "config.json").write_text(cfg)
    with pytest.raises(UnsupportedArchitecture, match="NotARealModelForCausalLM"):
        load_model(model_dir, TorchAttention(4), torch.device("cpu"), "float32")
