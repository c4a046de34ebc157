"""Phi-3 longrope: a sequence that outgrows `original_max_position_embeddings` switches to the long
factors. transformers then drops its cache and re-runs the whole sequence; the engine does the same for
just that sequence, in the middle of a batch, so every token and log-probability still matches."""

from __future__ import annotations

import pytest
import torch
from ragged_runs import run_reference
from tiny_models import make_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Phi3ForCausalLM

from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model
from lorax_server.sampling import SamplingParams

BLOCK = 4
ORIGINAL = 16
STEPS = 10
# Prompt lengths: crosses the switch during decode (10, 12, 16), starts past it (20), never reaches it (3).
LENGTHS = [10, 3, 20, 12, 16]


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory: pytest.TempPathFactory):
    half_rot = 64 // 4 // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(half_rot)],
        "long_factor": [4.0 + 2.0 * i for i in range(half_rot)],
    }
    model_dir = make_model(
        Phi3Config,
        Phi3ForCausalLM,
        tmp_path_factory.mktemp("phi3_longrope"),
        rope_parameters=rope,
        original_max_position_embeddings=ORIGINAL,
        max_position_embeddings=4 * ORIGINAL,
        pad_token_id=0,
    )
    model = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), CacheConfig(BLOCK, num_blocks=128))
    engine.warmup(max_input_length=32, max_prefill_tokens=64, max_total_tokens=64)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return engine, ref


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _run(engine: Engine, prompts: list[list[int]]) -> dict[int, list[tuple[int, float]]]:
    requests = [
        RequestIn(id=i, input_ids=p, sampling=SamplingParams(), max_new_tokens=STEPS, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    out: dict[int, list[tuple[int, float]]] = {r.id: [] for r in requests}
    gens, batch = engine.prefill(1, requests)
    while True:
        for g in gens:
            out[g.request_id].append((g.token_id, g.logprob))
        if batch is None:
            return out
        gens, batch = engine.decode([batch.id])


@torch.no_grad()
def test_crossing_the_original_context_matches_transformers(phi3_longrope) -> None:
    engine, ref = phi3_longrope
    prompts = _prompts(ref.config.vocab_size)
    got = _run(engine, prompts)
    for i, p in enumerate(prompts):
        _, logits, tokens = run_reference(ref, torch.tensor(p), STEPS)
        logprobs = torch.log_softmax(logits, -1)[torch.arange(STEPS), tokens].tolist()
        assert [t for t, _ in got[i]] == tokens, f"prompt of {len(p)} tokens"
        assert max(abs(a - b) for (_, a), b in zip(got[i], logprobs, strict=True)) < 1e-4, f"prompt of {len(p)}"


@torch.no_grad()
def test_the_switch_really_changes_logits(phi3_longrope) -> None:
    """Guard against a vacuous test: past the switch, a short-factor cache gives different logits."""
    _, ref = phi3_longrope
    ids = torch.tensor([_prompts(ref.config.vocab_size)[0]])  # 10 tokens
    full = torch.cat([ids, torch.arange(3, 3 + ORIGINAL + 1 - ids.shape[1])[None]], dim=1)  # 17 tokens: long
    recomputed = ref(full).logits[0, -1]
    cached = ref(full[:, :-1], use_cache=True)  # 16 tokens: short factors in the cache
    stale = ref(full[:, -1:], cache=cached.cache).logits[0, -1]
    assert (recomputed - stale).abs().max() > 1e-3  # ten times the parity tolerance above
