"""Decode graphs (`--compile`): everything around the CUDA capture (buckets, padding rows on the scratch
block, static inputs, stacks of adapter factors pinned at capture and kept current) checked on the CPU,
with the Triton kernels under the interpreter and each replay run eagerly on the static tensors
(`decode_graphs.replay_eagerly`). Outputs must equal eager decoding's: greedy ids and logprobs, in
mixed-adapter batches that shrink as requests finish and that an adapter new to the batch joins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_lora_adapter
from transformers import AutoTokenizer

from lorax_server import decode_graphs
from lorax_server.adapters import lora
from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine
from lorax_server.forward import ForwardBatch
from lorax_server.layers.triton.attention import TritonAttention
from lorax_server.models.loader import load_model
from lorax_server.sampling import SamplingParams

BLOCK = 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def engine(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("graph-adapters")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(decode_graphs.CAPTURE_BY_DEVICE, "cpu", decode_graphs.replay_eagerly)
        mp.setattr(decode_graphs, "STABLE_STEPS", 3)
        lora.set_kernels("triton")
        try:
            model = load_model(llama_dir, TritonAttention(BLOCK), CPU, "float32")
            fetch = lambda adapter_id, source, token: Path(adapter_id)  # noqa: E731
            manager = AdapterManager(model, fetch=fetch, device_budget_bytes=2**30)
            eng = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(BLOCK, num_blocks=257), manager,
                         cuda_graphs=True)  # fmt: skip
            eng.warmup(64, 256, 96)
            targets = [["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj", "o_proj"], ["q_proj", "k_proj"]]
            for i, modules in enumerate(targets, start=1):
                d = make_lora_adapter(llama_dir, tmp / f"a{i}", i, r=4 * i, lora_alpha=8, target_modules=modules)
                req = AdapterRequest(ids=(str(d),), source="local")
                manager.install(i, req, manager.prepare(req))
            yield eng
        finally:
            lora.set_kernels("torch")


def request(i: int, adapter: int, max_new: int) -> RequestIn:
    g = torch.Generator().manual_seed(i)
    prompt = torch.randint(3, 300, (5 + 3 * i,), generator=g).tolist()
    return RequestIn(id=i, input_ids=prompt, sampling=SamplingParams(), max_new_tokens=max_new, ignore_eos=True,
                     adapter_index=adapter, top_n_tokens=2)  # fmt: skip


def drive(engine: Engine, first: list[RequestIn], later: list[RequestIn], join_after: int) -> dict[int, list]:
    """Decode `first` to the end; `later` is prefilled after `join_after` steps and joins the batch."""
    out: dict[int, list] = {r.id: [] for r in first + later}
    gens, batch = engine.prefill(1, first)
    ids = [batch.id] if batch is not None else []
    step = 0
    while ids:
        for g in gens:
            out[g.request_id].append(g)
        if step == join_after:
            joined, extra = engine.prefill(2, later)
            for g in joined:
                out[g.request_id].append(g)
            ids += [extra.id] if extra is not None else []
        gens, batch = engine.decode(ids)
        ids = [batch.id] if batch is not None else []
        step += 1
    for g in gens:
        out[g.request_id].append(g)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return out


def test_replayed_decode_equals_eager_decode(engine: Engine) -> None:
    # Rows of base, adapter 1 and adapter 2 (6 → bucket 8, shrinking to 1 as they finish), then
    # adapter 3 joins: its q_proj factors are new to the kept stacks, so the graphs are captured again.
    first = [request(i, i % 3, 5 + 2 * i) for i in range(6)]
    later = [request(10 + i, 3 if i < 2 else 1, 9) for i in range(3)]
    graphs = engine.graphs
    assert graphs is not None and engine.blocks.num_blocks == engine.cache.num_blocks - 1  # the scratch block
    kept, engine.graphs = engine.graphs, None
    plain = drive(engine, first, later, join_after=4)
    engine.graphs = kept
    replayed = drive(engine, first, later, join_after=4)
    assert graphs.captures >= 2 and graphs.replays >= 10, (graphs.captures, graphs.replays)
    assert {g.size for g in graphs.graphs.values()} <= set(decode_graphs.BUCKETS)
    for r in first + later:
        a, b = plain[r.id], replayed[r.id]
        assert [g.token_id for g in b] == [g.token_id for g in a], r.id
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True)) < 1e-4
        for x, y in zip(a[1:], b[1:], strict=True):
            assert y.top_tokens.ids == x.top_tokens.ids


def test_a_new_stack_drops_the_graphs_and_steps_run_eagerly_until_stable(
    engine: Engine, llama_dir: Path, tmp_path: Path
) -> None:
    graphs = engine.graphs
    drive(engine, [request(20, 1, 8), request(21, 0, 8)], [], join_after=-1)
    captured = graphs.captures
    assert graphs.graphs, "a stable batch replays"
    # An adapter installed now is in no kept stack: its first step restacks, and the graphs go.
    d = make_lora_adapter(llama_dir, tmp_path / "a4", 4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    req = AdapterRequest(ids=(str(d),), source="local")
    engine.adapters.install(4, req, engine.adapters.prepare(req))
    calls = []
    original = graphs.model.forward
    graphs.model.forward = lambda meta, cache: calls.append(meta.pinned_stacks) or original(meta, cache)
    try:
        drive(engine, [request(22, 4, 3)], [], join_after=-1)
    finally:
        del graphs.model.forward
        engine.adapters.offload(4)
    assert graphs.captures == captured and not graphs.graphs  # dropped, none captured again yet
    assert calls == [False, False, False]  # the prompt, then two eager decode steps while the stacks settle


def test_steady_batches_skip_the_stack_check(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorax_server.adapters.lora import LoraSlots

    calls = []
    original = LoraSlots.keep_stack_for
    monkeypatch.setattr(LoraSlots, "keep_stack_for", lambda self, a: calls.append(a) or original(self, a))
    drive(engine, [request(23, 1, 8), request(24, 2, 8)], [], join_after=-1)  # 7 decode steps
    per_check = len(engine.graphs.lora_slots)
    assert per_check and len(calls) in (per_check, 2 * per_check)  # the first step or two, not every step


def tried_meta(rows: int) -> ForwardBatch:
    """A decode step's batch of `rows` rows (contexts of 4 tokens)."""
    ids, tables = torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, 2, dtype=torch.int64)
    return ForwardBatch.build(ids, [1] * rows, [4] * rows, tables, BLOCK)


def test_only_plain_decode_steps_within_the_buckets_are_served(engine: Engine) -> None:
    graphs = engine.graphs
    tables = torch.zeros(3, 2, dtype=torch.int64)
    decode = tried_meta(3)
    prompt = ForwardBatch.build(torch.zeros(5, dtype=torch.int64), [1, 3, 1], [4, 5, 6], tables, BLOCK)
    wide = ForwardBatch.build(torch.zeros(1, dtype=torch.int64), [1], [4], torch.zeros(1, 99, dtype=torch.int64), BLOCK)
    many = ForwardBatch.build(torch.zeros(200, dtype=torch.int64), [1] * 200, [4] * 200, torch.zeros(200, 1,
                              dtype=torch.int64), BLOCK)  # fmt: skip
    assert graphs.serves(decode)
    assert not graphs.serves(prompt) and not graphs.serves(wide) and not graphs.serves(many)


def test_graphs_are_off_where_they_cannot_run(llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lorax_server.layers.attention import TorchAttention

    model = load_model(llama_dir, TritonAttention(BLOCK), CPU, "float32")
    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(decode_graphs.CAPTURE_BY_DEVICE, "cpu", raising=False)  # as outside these tests
        assert not decode_graphs.available(model)
        assert "need a CUDA device" in caplog.text
        mp.setitem(decode_graphs.CAPTURE_BY_DEVICE, "cpu", decode_graphs.replay_eagerly)
        mp.setattr(lora, "_kernels", "torch")
        lora.set_kernels("triton")
        assert decode_graphs.available(model)
        lora.set_kernels("torch")
        assert not decode_graphs.available(model)
        assert "need the triton LoRA kernels, not torch" in caplog.text
        model.backend = TorchAttention(BLOCK)
        assert not decode_graphs.available(model)
        assert "need the triton attention backend, not torch" in caplog.text


def test_a_failed_capture_leaves_decoding_eager(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(run, pool):  # noqa: ANN001, ANN202
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = engine.graphs
    kept = graphs.buckets
    reqs = [request(1, 0, 4), request(2, 1, 4)]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(graphs, "capture", refuse)
            mp.setattr(decode_graphs, "STABLE_STEPS", 1)
            graphs.graphs.clear()
            tried = drive(engine, reqs, [], join_after=-1)
            assert graphs.buckets == () and not graphs.graphs and not graphs.serves(tried_meta(2))
    finally:
        graphs.buckets = kept
    engine.graphs = None
    try:
        plain = drive(engine, reqs, [], join_after=-1)
    finally:
        engine.graphs = graphs
    for r in reqs:
        assert [g.token_id for g in tried[r.id]] == [g.token_id for g in plain[r.id]]
    assert "capturing the decode graph of 2 rows failed" in caplog.text


def test_moe_expert_adapters_replayed_as_on_a_gpu(tmp_path: Path) -> None:
    """Mixtral with adapters on its experts, experts run as on a GPU (every expert on every row, no host
    sync): captured up to that many rows, replays equal to eager decoding."""
    from test_expert_lora import ADAPTERS as EXPERT_ADAPTERS
    from test_expert_lora import EXPERTS, write_adapter
    from tiny_models import make_model
    from transformers import MixtralConfig, MixtralForCausalLM

    from lorax_server.layers import moe

    base = make_model(MixtralConfig, MixtralForCausalLM, tmp_path / "base", num_local_experts=EXPERTS,
                      num_experts_per_tok=2, sliding_window=None)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(decode_graphs.CAPTURE_BY_DEVICE, "cpu", decode_graphs.replay_eagerly)
        mp.setitem(moe.EVERY_EXPERT_MAX_TOKENS, "cpu", 4)
        mp.setattr(decode_graphs, "STABLE_STEPS", 2)
        mp.setattr(lora, "_kernels", "torch")
        lora.set_kernels("triton")  # with the Triton backend, as the shard chooses them
        model = load_model(base, TritonAttention(BLOCK), CPU, "float32")
        manager = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
        for i, (name, (r, alpha, modules)) in enumerate(EXPERT_ADAPTERS.items(), start=1):
            req = AdapterRequest(ids=(str(write_adapter(tmp_path / name, i, r, alpha, modules)),), source="local")
            manager.install(i, req, manager.prepare(req))
        tokenizer = AutoTokenizer.from_pretrained(base)
        eng = Engine(model, tokenizer, CacheConfig(BLOCK, num_blocks=129), manager, cuda_graphs=True)
        eng.warmup(32, 64, 48)
        graphs = eng.graphs
        assert graphs.buckets == (1, 2, 4)  # no more rows than run every expert without a host sync
        reqs = [request(i, i % 3, 4 + 2 * i) for i in range(4)]
        eng.graphs = None
        plain = drive(eng, reqs, [], join_after=-1)
        eng.graphs = graphs
        replayed = drive(eng, reqs, [], join_after=-1)
    assert graphs.captures >= 2 and graphs.replays >= 5, (graphs.captures, graphs.replays)
    for r in reqs:
        a, b = plain[r.id], replayed[r.id]
        assert [g.token_id for g in b] == [g.token_id for g in a], r.id
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True)) < 1e-4
