"""Prefix caching: the block manager's sharing and eviction rules, the hash chain's keys, and the engine
answering exactly as without it (greedy ids, logprobs) in mixed-adapter batches, with hits only for the
same adapter and prefix, while other batches run, and under eviction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine
from lorax_server.kv_cache import BlockManager, OutOfBlocks
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model
from lorax_server.prefix_cache import block_hashes
from lorax_server.sampling import SamplingParams

BLOCK = 4


# Block manager ------------------------------------------------------------------------------------


def test_registered_blocks_are_shared_then_kept_until_recycled_least_recently_used_first() -> None:
    blocks = BlockManager(6, BLOCK)
    a = blocks.allocate(12)  # 3 blocks
    blocks.register(a[:2], [b"a0", b"a1"])
    assert blocks.match([b"a0", b"a1", b"a2"]) == a[:2]  # the longest registered run, referenced again
    shared = a[:2]
    blocks.free(a)
    assert blocks.num_free == 4  # a's third block is free; its first two are still referenced
    blocks.free(list(shared))
    assert blocks.num_free == 6 and blocks.num_cached == 2  # unreferenced, still cached, counted free
    assert blocks.match([b"a0"]) == shared[:1]
    blocks.free(shared[:1])

    b = blocks.allocate(16)  # 4 blocks: the 4 never-used ones before any cached block
    assert not set(b) & set(shared) and blocks.num_cached == 2
    c = blocks.allocate(4)  # recycles the least recently used cached block: a1 (a0 was used since)
    assert c == [shared[1]] and blocks.match([b"a0", b"a1"]) == [shared[0]]
    with pytest.raises(OutOfBlocks):
        blocks.allocate(4)
    for t in (b, c, [shared[0]]):
        blocks.free(t)
    assert blocks.num_free == 6


def test_register_keeps_the_first_block_of_a_prefix() -> None:
    blocks = BlockManager(4, BLOCK)
    first, second = blocks.allocate(4), blocks.allocate(4)
    blocks.register(first, [b"p"])
    blocks.register(second, [b"p"])  # computed at the same time: the first registration stays
    assert blocks.match([b"p"]) == first and blocks.num_cached == 1
    blocks.free(second)
    assert blocks.num_free == 3 and blocks.num_cached == 1  # `second` was never cached: plainly free


def test_block_hashes_chain_tokens_positions_and_adapter() -> None:
    ids = list(range(10))
    keys = block_hashes("base", ids, BLOCK, 9)
    assert len(keys) == 2  # only full blocks
    assert block_hashes("base", ids, BLOCK, 1) == keys[:1]
    assert block_hashes("base", ids[:8] + [99, 98], BLOCK, 2) == keys  # the partial tail does not count
    assert block_hashes(("org/a",), ids, BLOCK, 2)[0] != keys[0]  # another adapter never matches
    moved = block_hashes("base", [0, 1, 2, 9] + ids[4:], BLOCK, 2)
    assert moved[0] != keys[0] and moved[1] != keys[1]  # the same block after another prefix differs


# Attention ------------------------------------------------------------------------------------------


def test_cached_suffixes_are_not_padded_to_full_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill of short uncached suffixes next to full prompts and decode rows is attended in three
    groups, with the same output as one grid padded to the longest prompt."""
    from lorax_server.forward import ForwardBatch
    from lorax_server.layers import attention

    assert attention.padding_groups([0, 1, 2, 3], [10, 50, 12, 50], [60] * 4) == [[0, 2], [1, 3]]
    assert attention.padding_groups([0, 1], [8, 9], [8, 9]) == [[0, 1]]  # padding under 2× stays one grid
    query_lens, context_lens = [1, 10, 1, 50, 12, 50], [20, 60, 9, 60, 60, 50]
    g = torch.Generator().manual_seed(0)
    tables = torch.randperm(6 * 15, generator=g).view(6, 15).int()
    cache_k, cache_v = (torch.randn(6 * 15, BLOCK, 2, 16, generator=g) for _ in range(2))
    q = torch.randn(sum(query_lens), 4, 16, generator=g)
    meta = ForwardBatch.build(torch.zeros(sum(query_lens), dtype=torch.int64), query_lens, context_lens, tables, BLOCK)
    backend = TorchAttention(BLOCK, cpu_kernels=False)
    grouped = backend.attend(q, cache_k, cache_v, meta, 0.25, window=40)
    assert [len(g[1].context_lens) for g in meta.backend_state["torch"]] == [2, 2, 2]
    meta.backend_state.clear()
    monkeypatch.setattr(attention, "padding_groups", lambda seqs, q_lens, ctx: [seqs])
    one_grid = backend.attend(q, cache_k, cache_v, meta, 0.25, window=40)
    meta.backend_state.clear()
    monkeypatch.setattr(TorchAttention, "_group", lambda self, m: [(None, attention._PaddedLayout(m, BLOCK))])
    reference = backend.attend(q, cache_k, cache_v, meta, 0.25, window=40)
    torch.testing.assert_close(grouped, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one_grid, reference, rtol=1e-6, atol=1e-6)


# Engine ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(llama_dir, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    from tiny_models import make_lora_adapter

    tmp = tmp_path_factory.mktemp("prefix-adapters")
    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda adapter_id, source, token: Path(adapter_id), device_budget_bytes=2**30)
    engine = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(BLOCK, num_blocks=64), manager)
    for index, seed in [(1, 1), (2, 2)]:
        adapter = make_lora_adapter(llama_dir, tmp / f"a{index}", seed, r=4, target_modules=["q_proj", "v_proj"])
        request = AdapterRequest(ids=(str(adapter),), source="local")
        manager.install(index, request, manager.prepare(request))
    return engine


def fresh(engine: Engine, prefix_caching: bool, num_blocks: int = 64) -> Engine:
    """The engine with an empty KV cache of `num_blocks` blocks."""
    engine.cache_config.num_blocks = num_blocks
    engine.warmup(max_input_length=40, max_prefill_tokens=160, max_total_tokens=48)
    engine.prefix_caching = prefix_caching
    engine.cached_prompt_tokens = 0
    return engine


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


SHARED = prompt(100, 14)  # 3 full blocks and 2 tokens


def req(rid: int, tail: list[int], adapter: int = 0, max_new: int = 6, **kw) -> RequestIn:
    return RequestIn(rid, SHARED + tail, SamplingParams(), max_new, ignore_eos=True, adapter_index=adapter, **kw)


Answers = dict[int, list[tuple[int, float]]]


def run(engine: Engine, batches: list[tuple[int, list[RequestIn]]], overlap: bool) -> tuple[Answers, list[int]]:
    """Prefill each batch and decode to the end; with `overlap` a batch is prefilled while the earlier
    ones still decode (then they decode together). Returns the answers and each prefill's cached
    prompt tokens."""
    out: Answers = {}
    hits = []
    running: int | None = None

    def record(gens) -> None:  # noqa: ANN001
        for g in gens:
            out.setdefault(g.request_id, []).append((g.token_id, g.logprob))

    def step(ids: list[int]) -> int | None:
        gens, batch = engine.decode(ids)
        record(gens)
        return batch.id if batch is not None else None

    for batch_id, requests in batches:
        while running is not None and not overlap:
            running = step([running])
        before = engine.cached_prompt_tokens
        gens, batch = engine.prefill(batch_id, requests)
        hits.append(engine.cached_prompt_tokens - before)
        record(gens)
        ids = [b for b in (running, batch.id if batch is not None else None) if b is not None]
        running = step(ids) if ids else None
    while running is not None:
        running = step([running])
    return out, hits


def assert_same(got: Answers, want: Answers) -> None:
    assert got.keys() == want.keys()
    for rid in want:
        assert [t for t, _ in got[rid]] == [t for t, _ in want[rid]], rid
        diff = max(abs(a - b) for (_, a), (_, b) in zip(got[rid], want[rid], strict=True))
        assert diff < 1e-4, (rid, diff)


WORKLOAD = [
    (1, [req(1, prompt(1, 3)), req(2, prompt(2, 5), adapter=1)]),
    # The base and adapter 1 find the shared prompt's 3 blocks they computed; adapter 2 (never seen)
    # finds none of them; a prompt that leaves the shared one inside its second block finds 1 block.
    (2, [req(3, prompt(3, 2)), req(4, prompt(4, 7), adapter=1), req(5, prompt(5, 4), adapter=2),
         RequestIn(6, SHARED[:6] + prompt(6, 9), SamplingParams(), 6, ignore_eos=True)]),
    # The shared prompt alone (its last token is still computed), and adapter 2's blocks now exist.
    (3, [req(7, []), req(8, prompt(8, 1), adapter=2)]),
]  # fmt: skip
HITS = [0, 3 * BLOCK + 3 * BLOCK + 1 * BLOCK, 3 * BLOCK + 3 * BLOCK]  # cached prompt tokens per batch


@pytest.mark.parametrize("overlap", [False, True])
def test_answers_equal_those_without_prefix_caching(engine: Engine, overlap: bool) -> None:
    want, none = run(fresh(engine, False), WORKLOAD, overlap)
    assert none == [0, 0, 0]
    got, hits = run(fresh(engine, True), WORKLOAD, overlap)
    assert_same(got, want)
    assert hits == HITS
    assert engine.blocks.num_free == engine.blocks.num_blocks  # cached blocks count as free


def test_prompt_logprobs_are_computed_not_cached(engine: Engine) -> None:
    fresh(engine, True)
    _, hits = run(engine, [(1, [req(1, prompt(1, 3))]), (2, [req(2, prompt(2, 1))])], overlap=False)
    assert hits == [0, 3 * BLOCK]
    before = engine.cached_prompt_tokens
    gens, _ = engine.prefill(3, [req(3, prompt(3, 3), prefill_logprobs=True)])
    assert engine.cached_prompt_tokens == before
    engine.clear()
    fresh(engine, False)
    plain, _ = engine.prefill(3, [req(3, prompt(3, 3), prefill_logprobs=True)])
    engine.clear()
    got, want = gens[0].prefill.logprobs[1:], plain[0].prefill.logprobs[1:]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4


def test_eviction_under_memory_pressure(engine: Engine) -> None:
    """A cache with room for little more than one batch: older prefixes are recycled for new requests,
    a recycled prefix is computed again, and every answer still equals the uncached one."""
    prefixes = [prompt(200 + i, 12) for i in range(4)]

    def workload() -> list[tuple[int, list[RequestIn]]]:
        order = [0, 1, 2, 3, 0, 3]
        return [
            (b, [RequestIn(b * 10 + j, prefixes[p] + prompt(b * 10 + j, 2), SamplingParams(), 6, ignore_eos=True)
                 for j in range(2)])
            for b, p in enumerate(order, start=1)
        ]  # fmt: skip

    want, _ = run(fresh(engine, False, num_blocks=12), workload(), overlap=False)
    got, hits = run(fresh(engine, True, num_blocks=12), workload(), overlap=False)
    assert_same(got, want)
    # In every batch the second request shares the first's 3 prefix blocks, written in the same pass.
    # Each batch takes 7 of the 12 blocks, so it recycles what earlier batches cached, least recently
    # used and tails first: prefix 0 is gone when batch 5 asks for it again (only its second request
    # hits), while batch 4's prefix 3 is whole for both requests of batch 6.
    assert hits == [3 * BLOCK] * 5 + [2 * 3 * BLOCK]
    assert engine.blocks.num_free == 12


def test_a_failed_prefill_leaves_nothing_to_reuse(engine: Engine, monkeypatch) -> None:  # noqa: ANN001
    """Blocks registered for a forward pass that failed were never written: no later prompt finds them."""
    fresh(engine, True)
    want, _ = run(fresh(engine, False), [(1, [req(1, prompt(1, 3))])], overlap=False)
    fresh(engine, True)

    def broken(meta, cache):  # noqa: ANN001, ANN202
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(engine.model, "forward", broken)
        with pytest.raises(RuntimeError, match="device lost"):
            engine.prefill(1, [req(1, prompt(1, 3)), req(2, prompt(2, 3))])
    assert engine.blocks.num_cached == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    got, hits = run(engine, [(1, [req(1, prompt(1, 3))])], overlap=False)
    assert hits == [0]
    assert_same(got, want)


def test_a_model_that_rewrites_its_cache_turns_prefix_caching_off(engine: Engine, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(type(engine.model), "recompute_at_length", property(lambda self: 32))
    other = Engine(engine.model, engine.tokenizer, CacheConfig(BLOCK, num_blocks=8, prefix_caching=True))
    assert other.prefix_caching is False
