"""Speculative decoding by prompt lookup: the drafts found, and outputs identical to plain decoding
(greedy ids, logprobs, seeded sampling, penalties, top-n, stops) in mixed-adapter batches, with drafts
both accepted and rejected along the way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import build_family
from tiny_models import make_lora_adapter
from transformers import AutoTokenizer

from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model
from lorax_server.prompt_lookup import NgramIndex
from lorax_server.sampling import SamplingParams
from lorax_server.speculation import (
    SpeculationConfig,
    Speculator,
    draft_caps,
    next_draft_limit,
    row_drafts,
    within_budget,
)

BLOCK = 4
K = 4


def brute_force_lookup(ids: list[int], k: int, max_ngram: int) -> tuple[list[int], int]:
    """The definition: the longest n whose last-n run occurred before, ending before the last id; of
    those occurrences the latest; the ids after it."""
    for n in range(min(max_ngram, len(ids)), 0, -1):
        tail = ids[-n:]
        ends = [e for e in range(n - 1, len(ids) - 1) if ids[e - n + 1 : e + 1] == tail]
        if ends:
            return ids[ends[-1] + 1 : ends[-1] + 1 + k], n
    return [], 0


def test_lookup_takes_the_latest_longest_match_and_stops_at_known_tokens() -> None:
    rows = [
        ([5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7], [9, 2, 6, 7], 2),  # "6 7" twice before: the latest wins
        ([1, 2, 3, 4, 9, 9, 3, 4, 5, 2, 3, 4], [9, 9, 3, 4], 3),  # "2 3 4" beats the later "3 4"
        ([1, 2, 3, 4, 5], [], 0),  # nothing repeats
        ([7, 3, 7], [3, 7], 1),  # "7" then 3: two known ids to copy
        ([4], [], 0),  # too short to look anything up
    ]
    for ids, drafts, matched in rows:
        assert NgramIndex(ids, max_ngram=3).propose([], K) == (drafts, matched)


def test_lookup_index_grows_with_the_output_and_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        prompt = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        index, generated = NgramIndex(prompt, max_ngram=3), []
        for _ in range(40):
            # 1-5 ids a step, as a drafting step emits; some steps are skipped (no lookup made)
            generated += torch.randint(0, 6, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            if torch.rand(1, generator=g) < 0.7:
                assert index.propose(generated, K) == brute_force_lookup(prompt + generated, K, 3), trial


def test_draft_limits_follow_what_the_model_keeps() -> None:
    assert next_draft_limit(4, drafted=4, kept=4, k=4) == 4
    assert next_draft_limit(2, drafted=2, kept=2, k=4) == 3
    assert next_draft_limit(4, drafted=3, kept=1, k=4) == 1
    assert next_draft_limit(1, drafted=1, kept=0, k=4) == 0
    assert next_draft_limit(3, drafted=0, kept=0, k=4) == 3  # nothing drafted: nothing learnt
    assert row_drafts(known=4, matched=2, cap=3, limit=4, max_ngram=3) == 3
    assert row_drafts(known=4, matched=2, cap=4, limit=0, max_ngram=3) == 0
    assert row_drafts(known=4, matched=3, cap=4, limit=0, max_ngram=3) == 1  # a full match is tried again


def test_the_step_budget_serves_the_longest_matches_first() -> None:
    assert within_budget([2, 3, 1], [1, 2, 3], 10) == [2, 3, 1]
    assert within_budget([2, 3, 1], [1, 2, 3], 3) == [0, 2, 1]
    assert within_budget([2, 3], [1, 1], -2) == [0, 0]


def test_caps_keep_drafts_inside_max_new_tokens_grammar_and_length_dependent_rope() -> None:
    caps = draft_caps([10, 10, 10, 10], [1, 3, 9, 9], [False, False, True, False], K, None)
    assert caps == [0, 2, 0, 4]
    assert draft_caps([10, 30], [9, 9], [False, False], K, 12) == [2, 0]


@pytest.fixture(scope="module")
def engine(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    tmp = tmp_path_factory.mktemp("spec-adapters")
    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda adapter_id, source, token: Path(adapter_id), device_budget_bytes=2**30)
    eng = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(BLOCK, num_blocks=1024), manager)
    eng.warmup(96, 512, 160)
    targets = [["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj", "o_proj"]]
    for i, modules in enumerate(targets, start=1):
        d = make_lora_adapter(llama_dir, tmp / f"a{i}", i, r=8, lora_alpha=16, target_modules=modules)
        req = AdapterRequest(ids=(str(d),), source="local")
        manager.install(i, req, manager.prepare(req))
    return eng


def copy_heavy(seed: int, n: int) -> list[int]:
    """A random passage said twice: its second half is what lookup drafts from."""
    g = torch.Generator().manual_seed(seed)
    passage = torch.randint(3, 320, (n,), generator=g).tolist()
    return passage + [1 + seed % 2] + passage[: n // 2]


def requests(**kw) -> list[RequestIn]:  # noqa: ANN003
    out = []
    for i in range(6):
        sampling = kw.get("sampling", SamplingParams())
        if callable(sampling):
            sampling = sampling(i)
        out.append(RequestIn(
            id=i, input_ids=copy_heavy(i, 12 + 3 * i), sampling=sampling, max_new_tokens=kw.get("max_new", 24),
            ignore_eos=kw.get("ignore_eos", True), adapter_index=i % 3, top_n_tokens=kw.get("top_n", 0),
            stop_sequences=kw.get("stops", []),
        ))  # fmt: skip
    return out


def run(engine: Engine, reqs: list[RequestIn], speculate: bool) -> dict[int, list]:
    """Prefill then decode to the end; every request's generations, in order."""
    spec = Speculator(SpeculationConfig(K), engine.model, engine.emitter, engine.adapters)
    engine.speculator = spec if speculate else None
    out: dict[int, list] = {r.id: [] for r in reqs}
    gens, batch = engine.prefill(7 if speculate else 8, reqs)
    while True:
        for g in gens:
            out[g.request_id].append(g)
        if batch is None:
            break
        gens, batch = engine.decode([batch.id])
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return out


def compare(engine: Engine, reqs: list[RequestIn], refusals: bool = True) -> Speculator:
    plain = run(engine, reqs, speculate=False)
    fast = run(engine, reqs, speculate=True)
    spec = engine.speculator
    for r in reqs:
        a, b = plain[r.id], fast[r.id]
        assert [g.token_id for g in b] == [g.token_id for g in a], r.id
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True)) < 1e-4
        assert [g.text for g in b] == [g.text for g in a]
        assert b[-1].finished is not None and b[-1].finished.text == a[-1].finished.text
        assert b[-1].finished.reason == a[-1].finished.reason
        assert not b[0].skipped and not any(g.skipped for g in a)
        for x, y in zip(a, b, strict=True):
            if x.top_tokens is not None:
                assert y.top_tokens.ids == x.top_tokens.ids
                assert max(abs(p - q) for p, q in zip(x.top_tokens.logprobs, y.top_tokens.logprobs, strict=True)) < 1e-4
    # Speculation did happen, drafts were both kept and refused.
    skipped = sum(g.skipped for gens in fast.values() for g in gens)
    assert skipped == spec.accepted_tokens > 0
    assert spec.drafted_tokens > spec.accepted_tokens or not refusals
    return spec


def test_greedy_mixed_adapters_identical_with_fewer_steps(engine: Engine) -> None:
    compare(engine, requests(top_n=3))


def test_seeded_sampling_and_penalties_identical(engine: Engine) -> None:
    def sampling(i: int) -> SamplingParams:
        if i % 2:
            return SamplingParams(do_sample=True, temperature=0.3, top_k=20, top_p=0.9, seed=100 + i)
        return SamplingParams(repetition_penalty=1.05, frequency_penalty=0.01, presence_penalty=0.005)

    compare(engine, requests(sampling=sampling))


def test_watermarked_requests_identical(engine: Engine) -> None:
    """Each drafted position's green list is seeded by the token before it, drafts included."""

    def sampling(i: int) -> SamplingParams:
        return SamplingParams(watermark=True, do_sample=bool(i % 2), seed=200 + i)

    compare(engine, requests(sampling=sampling), refusals=False)


def test_stops_end_where_plain_decoding_ends(engine: Engine) -> None:
    reqs = requests(max_new=17, ignore_eos=False)
    plain = run(engine, reqs, speculate=False)
    # Stop on text the plain run produced mid-way, so a request stops inside an accepted draft.
    stops = {r.id: plain[r.id][6].text for r in reqs if plain[r.id][6].text.strip()}
    for r in reqs:
        r.stop_sequences = [stops[r.id]] if r.id in stops else []
    compare(engine, reqs)


def test_large_batches_do_not_draft(engine: Engine) -> None:
    reqs = requests()
    for r in reqs:
        r.max_new_tokens = 6 + 4 * r.id  # the batch shrinks as they finish
    engine.speculator = Speculator(SpeculationConfig(K, max_batch_size=4), engine.model, engine.emitter)
    gens, batch = engine.prefill(9, reqs)
    while batch is not None:
        rows = len(batch)
        gens, batch = engine.decode([batch.id])
        if rows > 4:
            assert not any(g.skipped for g in gens) and engine.speculator.drafted_tokens == 0
    assert engine.speculator.accepted_tokens > 0  # once the batch was small enough


@pytest.mark.parametrize("family", ["mistral", "gemma2", "bloom", "mixtral", "phi3", "qwen_v1"])
def test_families_identical_with_speculation(family: str, tmp_path: Path) -> None:
    """Sliding windows, soft caps, ALiBi, MoE, longrope and dynamic NTK (drafts stop below the lengths
    where rotary frequencies depend on the length) attend drafts as plain decoding does."""
    model_dir, _ = build_family(family, tmp_path / "base")
    model = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    eng = Engine(model, AutoTokenizer.from_pretrained(model_dir), CacheConfig(BLOCK, num_blocks=512))
    eng.warmup(64, 256, 150)
    reqs = [RequestIn(id=i, input_ids=copy_heavy(i, 10 + 4 * i), sampling=SamplingParams(), max_new_tokens=40,
                      ignore_eos=True, top_n_tokens=2) for i in range(4)]  # fmt: skip
    compare(eng, reqs, refusals=False)


def test_with_chunked_prefill_and_prefix_caching(llama_dir: Path) -> None:
    """Steps that carry prompt chunks decode plainly; the others draft. Answers stay the same."""
    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    cache = CacheConfig(BLOCK, num_blocks=1024, prefix_caching=True)
    eng = Engine(model, AutoTokenizer.from_pretrained(llama_dir), cache, chunked_prefill=True)
    eng.warmup(96, 16, 160)  # prompts of up to 96 tokens, 16 per step
    reqs = [RequestIn(id=i, input_ids=copy_heavy(i % 3, 20 + 3 * (i % 3)), sampling=SamplingParams(),
                      max_new_tokens=30, ignore_eos=True) for i in range(5)]  # fmt: skip
    compare(eng, reqs)


def test_constrained_rows_beside_drafting_rows(engine: Engine) -> None:
    """Rows under a grammar never draft; the batch's other rows do, and every answer stays the same."""
    from lorax_server.grammar import GrammarKind, GrammarSpec

    reqs = requests(max_new=20)
    for r in reqs[::2]:
        r.grammar = GrammarSpec(GrammarKind.REGEX, "[a-z ]{4,30}")
        r.ignore_eos = False
    compare(engine, reqs, refusals=False)
