"""Chunked prefill: prompts longer than the chunk budget are computed a piece per step, in the steps
that decode the running batch, and every answer (tokens, logprobs, prompt logprobs) equals the one of
a whole-prompt prefill, with mixed adapters, with prefix caching, and while other requests decode."""

from __future__ import annotations

import math

import pytest
import torch
from test_prefix_caching import BLOCK, assert_same, engine, prompt, run  # noqa: F401 - `engine` is a fixture

from lorax_server.batch import RequestIn
from lorax_server.engine import Engine
from lorax_server.sampling import SamplingParams


def configure(engine: Engine, chunk: int | None, prefix_caching: bool = False) -> Engine:  # noqa: F811
    """The engine with an empty KV cache, computing at most `chunk` prompt tokens a step (None: whole)."""
    engine.cache_config.num_blocks = 96
    engine.chunked_prefill = chunk is not None
    engine.warmup(max_input_length=40, max_prefill_tokens=chunk or 160, max_total_tokens=56)
    engine.prefix_caching = prefix_caching
    engine.cached_prompt_tokens = 0
    return engine


def req(rid: int, n: int, adapter: int = 0, max_new: int = 6, **kw) -> RequestIn:
    return RequestIn(rid, prompt(rid, n), SamplingParams(), max_new, ignore_eos=True, adapter_index=adapter, **kw)


def with_prompt_logprobs(engine: Engine, batches: list[tuple[int, list[RequestIn]]]) -> dict[int, list[float]]:  # noqa: F811
    """Run the batches to the end (one after the other); each request's prompt logprobs."""
    out = {}
    for batch_id, requests in batches:
        gens, batch = engine.prefill(batch_id, requests)
        while True:
            out.update({g.request_id: g.prefill.logprobs for g in gens if g.prefill is not None})
            if batch is None:
                break
            gens, batch = engine.decode([batch.id])
    return out


WORKLOAD = [
    (1, [req(1, 37), req(2, 5, adapter=1), req(3, 23, adapter=2)]),
    (2, [req(4, 40, adapter=1), req(5, 3), req(6, 17, adapter=2, max_new=9)]),
    (3, [req(7, 12), req(8, 33)]),
]


@pytest.mark.parametrize("chunk", [7, 16])
@pytest.mark.parametrize("overlap", [False, True])
def test_chunked_answers_equal_whole_prompt_answers(engine: Engine, chunk: int, overlap: bool) -> None:  # noqa: F811
    want, _ = run(configure(engine, None), WORKLOAD, overlap)
    got, _ = run(configure(engine, chunk), WORKLOAD, overlap)
    assert_same(got, want)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_chunked_with_prefix_caching(engine: Engine) -> None:  # noqa: F811
    """A chunked prompt's blocks become reusable as each chunk is written; a later prompt with the same
    prefix reuses them while the first is still being prefilled."""
    shared = prompt(50, 24)
    first = RequestIn(1, shared + prompt(1, 10), SamplingParams(), 6, ignore_eos=True)
    second = RequestIn(2, shared + prompt(2, 3), SamplingParams(), 6, ignore_eos=True)
    workload = [(1, [first]), (2, [second])]
    want, _ = run(configure(engine, None), workload, overlap=True)
    got, hits = run(configure(engine, 8, prefix_caching=True), workload, overlap=True)
    assert_same(got, want)
    # `first` computed 8 tokens in its prefill and 8 more in the decode step before `second` arrived:
    # 16 tokens, 4 blocks of its prefix, are cached for `second`.
    assert hits == [0, 16]


def test_prompt_logprobs_gathered_across_chunks(engine: Engine) -> None:  # noqa: F811
    requests = [req(1, 30, prefill_logprobs=True), req(2, 9, adapter=1, prefill_logprobs=True), req(3, 21)]
    want = with_prompt_logprobs(configure(engine, None), [(1, requests)])
    got = with_prompt_logprobs(configure(engine, 8), [(1, requests)])
    assert got.keys() == want.keys() == {1, 2}
    for rid in want:
        assert math.isnan(got[rid][0]) and len(got[rid]) == len(want[rid])
        assert max(abs(a - b) for a, b in zip(got[rid][1:], want[rid][1:], strict=True)) < 1e-4


def test_a_long_prompt_never_stalls_the_running_batch(engine: Engine) -> None:  # noqa: F811
    configure(engine, 8)
    gens, running = engine.prefill(1, [req(1, 4, max_new=12)])
    assert [g.request_id for g in gens] == [1]
    gens, pending = engine.prefill(2, [req(2, 40)])  # 8 of its 40 tokens
    assert gens == [] and pending.request_ids == [2] and len(pending) == 0
    steps = 0
    batch_ids = [running.id, pending.id]
    while True:
        gens, batch = engine.decode(batch_ids)
        batch_ids = [batch.id]
        steps += 1
        ids = sorted(g.request_id for g in gens)
        if 2 in ids:
            break
        assert ids == [1]  # the running request gets its token every step
    assert steps == 4  # 8 more tokens a step: 16, 24, 32, 40, when its first token comes
    assert sorted(batch.request_ids) == [1, 2] and len(batch) == 2


def test_a_pending_request_can_be_filtered_out_and_blocks_its_adapter(engine: Engine) -> None:  # noqa: F811
    configure(engine, 8)
    _, batch = engine.prefill(1, [req(1, 40, adapter=2), req(2, 30)])
    assert len(batch) == 0 and sorted(batch.request_ids) == [1, 2]
    assert engine.adapter_in_use(2)  # its adapter must not be offloaded under it
    kept = engine.filter(1, [2])
    assert kept.request_ids == [2] and not engine.adapter_in_use(2)
    assert engine.filter(1, []) is None
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_without_chunking_a_prompt_is_computed_in_its_prefill(engine: Engine) -> None:  # noqa: F811
    configure(engine, None)
    gens, batch = engine.prefill(1, [req(1, 40), req(2, 38)])
    assert sorted(g.request_id for g in gens) == [1, 2] and len(batch) == 2
    engine.clear()
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.fixture(scope="module")
def dynamic_rope(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A model whose rotary frequencies depend on the sequence's length beyond 24 tokens (dynamic NTK)."""
    from tiny_models import make_llama
    from transformers import AutoTokenizer

    from lorax_server.engine import CacheConfig
    from lorax_server.layers.attention import TorchAttention
    from lorax_server.models.loader import load_model

    model_dir = make_llama(
        tmp_path_factory.mktemp("dynamic"),
        max_position_embeddings=24,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    model = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    assert model.length_dependent_above == 24
    return Engine(model, AutoTokenizer.from_pretrained(model_dir), CacheConfig(BLOCK, num_blocks=96))


def test_length_dependent_rotary_chunks_and_prefixes_stay_exact(dynamic_rope: Engine) -> None:
    """A chunk of a long prompt is rotated as the whole prompt is; a cached prefix is reused only by a
    prompt of the same length (its keys depend on the length), so every answer stays exact."""
    shared = prompt(60, 28)
    workload = [
        (1, [RequestIn(1, shared + prompt(1, 8), SamplingParams(), 6, ignore_eos=True)]),
        (2, [RequestIn(2, shared + prompt(2, 4), SamplingParams(), 6, ignore_eos=True),  # other length: miss
             RequestIn(3, shared[:20], SamplingParams(), 6, ignore_eos=True)]),  # under 24 tokens
        (3, [RequestIn(4, shared + prompt(4, 8), SamplingParams(), 6, ignore_eos=True),  # same length: hit
             RequestIn(5, shared[:20] + prompt(5, 2), SamplingParams(), 6, ignore_eos=True)]),  # hit
    ]  # fmt: skip
    want, _ = run(configure(dynamic_rope, None), workload, overlap=True)
    got, _ = run(configure(dynamic_rope, 8), workload, overlap=True)
    assert_same(got, want)
    got, hits = run(configure(dynamic_rope, None, prefix_caching=True), workload, overlap=True)
    assert_same(got, want)
    assert hits == [0, 0, 7 * BLOCK + 5 * BLOCK]
    got, _ = run(configure(dynamic_rope, 8, prefix_caching=True), workload, overlap=True)
    assert_same(got, want)
