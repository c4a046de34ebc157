"""The batching engine: greedy tokens equal transformers, continuous batching changes nothing,
bad requests are refused without side effects."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.batch import RequestIn
from lorax_server.engine import BatchNotFound, CacheConfig, Engine, NotWarmedUp, RequestError
from lorax_server.kv_cache import OutOfBlocks
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model
from lorax_server.sampling import SamplingParams
from lorax_server.stopping import FinishReason

BLOCK = 4


def make_engine(model_dir, num_blocks: int = 512) -> Engine:
    model = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), CacheConfig(BLOCK, num_blocks=num_blocks))
    engine.warmup(max_input_length=64, max_prefill_tokens=128, max_total_tokens=96)
    return engine


@pytest.fixture(scope="module")
def engine(llama_dir) -> Engine:
    return make_engine(llama_dir)


@pytest.fixture(scope="module")
def reference(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def req(rid: int, ids: list[int], max_new: int = 8, **kw) -> RequestIn:
    sampling = kw.pop("sampling", SamplingParams())
    return RequestIn(id=rid, input_ids=ids, sampling=sampling, max_new_tokens=max_new, ignore_eos=True, **kw)


def prompt(seed: int, n: int, vocab: int = 320) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run(engine: Engine, batch_id: int, requests: list[RequestIn]) -> dict[int, list[int]]:
    """Prefill then decode until every request finishes; returns the tokens of each."""
    tokens: dict[int, list[int]] = {r.id: [] for r in requests}
    gens, batch = engine.prefill(batch_id, requests)
    while True:
        for g in gens:
            tokens[g.request_id].append(g.token_id)
        if batch is None:
            return tokens
        gens, batch = engine.decode([batch.id])


@torch.no_grad()
def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    seq = torch.tensor([ids])
    for _ in range(n):
        nxt = model(seq).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids) :].tolist()


def test_ragged_greedy_batch_equals_transformers(engine: Engine, reference) -> None:
    requests = [req(i, prompt(i, n), max_new=16) for i, n in enumerate([5, 17, 2, 30, 9])]
    got = run(engine, 1, requests)
    for r in requests:
        assert got[r.id] == greedy_reference(reference, r.input_ids, 16)
    assert engine.blocks.num_free == engine.blocks.num_blocks  # everything freed once finished


def test_sequences_joining_and_leaving_mid_flight_get_their_solo_tokens(engine: Engine) -> None:
    specs = [(11, 6), (3, 12), (20, 4), (7, 10), (14, 9), (5, 7)]
    requests = [req(100 + i, prompt(50 + i, n), max_new=m) for i, (n, m) in enumerate(specs)]
    solo = {r.id: run(engine, 900 + i, [r])[r.id] for i, r in enumerate(requests)}

    tokens: dict[int, list[int]] = {r.id: [] for r in requests}

    def record(gens) -> None:  # noqa: ANN001
        for g in gens:
            tokens[g.request_id].append(g.token_id)

    gens, a = engine.prefill(1, requests[:3])
    record(gens)
    for _ in range(2):
        gens, a = engine.decode([a.id])
        record(gens)
    gens, b = engine.prefill(2, requests[3:5])  # joins a running batch
    record(gens)
    gens, ab = engine.decode([a.id, b.id])
    record(gens)
    assert set(ab.request_ids) == {100, 101, 103, 104}  # 102 (max_new=4) has finished and left
    cancelled = 103
    ab = engine.filter(ab.id, [rid for rid in ab.request_ids if rid != cancelled])
    gens, c = engine.prefill(3, requests[5:])
    record(gens)
    gens, batch = engine.decode([ab.id, c.id])
    record(gens)
    while batch is not None:
        gens, batch = engine.decode([batch.id])
        record(gens)
    for r in requests:
        if r.id == cancelled:
            assert tokens[r.id] == solo[r.id][: len(tokens[r.id])]
        else:
            assert tokens[r.id] == solo[r.id], r.id
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible_in_any_batch(engine: Engine) -> None:
    sampling = SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    target = req(1, prompt(7, 9), max_new=12, sampling=sampling)
    alone = run(engine, 1, [target])[1]
    others = [
        req(2 + i, prompt(30 + i, 5 + i), max_new=12, sampling=SamplingParams(do_sample=True, seed=i)) for i in range(3)
    ]
    mixed = run(engine, 2, [others[0], target, *others[1:]])[1]
    assert alone == mixed
    other_seed = run(
        engine,
        3,
        [req(1, target.input_ids, 12, sampling=SamplingParams(do_sample=True, temperature=0.9, seed=99))],
    )[1]
    assert other_seed != alone


def test_finish_details_and_texts(engine: Engine) -> None:
    tok = engine.tokenizer
    ids = tok("Paged attention").input_ids
    gens, batch = engine.prefill(5, [req(1, ids, max_new=1)])
    assert batch is None
    fin = gens[0].finished
    assert fin.reason == FinishReason.LENGTH and fin.generated_tokens == 1 and fin.seed is None
    assert fin.text == tok.decode([gens[0].token_id], skip_special_tokens=True)


def test_prefill_logprobs_and_top_tokens(engine: Engine, reference) -> None:
    ids = prompt(3, 8)
    gens, _ = engine.prefill(6, [req(1, ids, max_new=1, prefill_logprobs=True, top_n_tokens=5)])
    g = gens[0]
    assert g.prefill.ids == ids and math.isnan(g.prefill.logprobs[0])
    with torch.no_grad():
        lp = torch.log_softmax(reference(torch.tensor([ids])).logits[0], -1)
    want = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert g.prefill.logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert len(g.top_tokens.ids) == 5 and g.top_tokens.ids[0] == g.token_id
    assert g.top_tokens.logprobs == sorted(g.top_tokens.logprobs, reverse=True)
    assert g.logprob == pytest.approx(lp[-1].max().item(), abs=1e-4)


def test_bad_requests_are_refused_without_side_effects(llama_dir) -> None:
    engine = make_engine(llama_dir, num_blocks=40)  # 160 tokens
    free = engine.blocks.num_free
    with pytest.raises(RequestError, match="empty input"):
        engine.prefill(1, [req(1, [], max_new=4)])
    with pytest.raises(RequestError, match="exceed the KV cache"):
        engine.prefill(1, [req(1, prompt(1, 150), max_new=20)])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.prefill(1, [req(1, [5, 10_000], max_new=4)])
    with pytest.raises(RequestError, match="unique"):
        engine.prefill(1, [req(1, [5], max_new=4), req(1, [6], max_new=4)])
    with pytest.raises(BatchNotFound):
        engine.decode([77])
    with pytest.raises(BatchNotFound):
        engine.filter(77, [1])
    _, batch = engine.prefill(1, [req(1, prompt(2, 60), max_new=60)])  # holds 30 of 40 blocks
    with pytest.raises(OutOfBlocks):
        engine.prefill(2, [req(2, prompt(3, 40), max_new=20)])
    with pytest.raises(RequestError, match="already exists"):
        engine.prefill(1, [req(3, [5], max_new=1)])
    engine.clear()
    assert engine.blocks.num_free == free
    assert run(engine, 3, [req(9, prompt(4, 5), max_new=3)])[9]  # still serving


def test_prefill_before_warmup_is_refused(llama_dir) -> None:
    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    engine = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(BLOCK, num_blocks=8))
    with pytest.raises(NotWarmedUp):
        engine.prefill(1, [req(1, [5], max_new=1)])


def test_warmup_sizes_the_cache_from_the_memory_budget(llama_dir) -> None:
    """Without --kv-cache-blocks the cache takes its share of available memory (adapters on CPU have
    their own budget and do not eat into it)."""
    from pathlib import Path

    import psutil

    from lorax_server.adapters.manager import AdapterManager

    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    adapters = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**40)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    engine = Engine(model, tok, CacheConfig(BLOCK, memory_fraction=1e-4), adapters)
    tokens = engine.warmup(max_input_length=32, max_prefill_tokens=64, max_total_tokens=64)
    per_token = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    expected = psutil.virtual_memory().available * 1e-4 / per_token
    assert 0.5 * expected < tokens < 2 * expected
    tiny = Engine(model, tok, CacheConfig(BLOCK, memory_fraction=1e-12))
    with pytest.raises(RequestError, match="KV cache holds"):
        tiny.warmup(max_input_length=32, max_prefill_tokens=64, max_total_tokens=64)


class _ForwardSpy:
    """Wraps the model's forward to record which KV cache each call wrote to."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.forward, self.caches = engine, engine.model.forward, []

    def __call__(self, meta, cache):  # noqa: ANN001, ANN204
        self.caches.append(cache)
        return self.forward(meta, cache)


def _decode_all(engine: Engine, batch, gens, tokens: dict[int, list[int]], between=None) -> None:  # noqa: ANN001
    while True:
        for g in gens:
            tokens[g.request_id].append(g.token_id)
        if batch is None:
            return
        if between is not None:
            between()
        gens, batch = engine.decode([batch.id])


@pytest.mark.parametrize("fill", [False, True], ids=["free-block", "all-blocks-in-use"])
def test_health_runs_one_token_beside_cached_batches(llama_dir, monkeypatch: pytest.MonkeyPatch, fill: bool) -> None:
    """Health's forward pass borrows a free block (restored and freed) or, with every block taken, a
    scratch cache; either way the cached batch's tokens and the shared cache are unchanged."""
    engine = make_engine(llama_dir, num_blocks=24)  # 96 tokens
    requests = [req(1, prompt(61, 30), max_new=18), req(2, prompt(62, 9), max_new=(39 if fill else 11))]
    without_health = run(engine, 1, requests)
    spy = _ForwardSpy(engine)
    monkeypatch.setattr(engine.model, "forward", spy)
    gens, batch = engine.prefill(2, requests)
    assert (engine.blocks.num_free == 0) == fill
    free = engine.blocks.num_free
    snapshot = [t.clone() for t in [*engine.cache.keys, *engine.cache.values]]
    engine.health()
    assert engine.blocks.num_free == free
    assert all(torch.equal(a, b) for a, b in zip(snapshot, [*engine.cache.keys, *engine.cache.values], strict=True))
    assert (spy.caches[-1] is engine.cache) != fill
    tokens: dict[int, list[int]] = {1: [], 2: []}
    _decode_all(engine, batch, gens, tokens, between=engine.health)
    assert tokens == without_health
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_health_before_warmup_and_when_the_forward_pass_fails(llama_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorax_server.engine import HealthCheckFailed

    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    engine = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(BLOCK, num_blocks=8))
    engine.health()  # no KV cache yet: a scratch block
    engine.warmup(max_input_length=8, max_prefill_tokens=8, max_total_tokens=16)

    def broken(meta, cache):  # noqa: ANN001, ANN202
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.model, "forward", broken)
    with pytest.raises(HealthCheckFailed, match="device lost"):
        engine.health()
    assert engine.blocks.num_free == engine.blocks.num_blocks  # the borrowed block came back
    monkeypatch.setattr(engine.model, "forward", lambda meta, cache: torch.full((1, 320), float("nan")))
    with pytest.raises(HealthCheckFailed, match="non-finite"):
        engine.health()
    monkeypatch.undo()
    engine.health()
