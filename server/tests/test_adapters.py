"""Mixed-adapter batches equal peft: base rows and four LoRA adapters (ranks 4/8/16/64; attention-only,
MLP-only, all-linear; rslora; alpha != r) in one ragged batch, prefill logits and greedy decode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import make_llama, make_lora_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.adapters import manager as adapter_manager
from lorax_server.adapters.loader import AdapterLoadError, adapter_nbytes, load_lora_adapter
from lorax_server.adapters.lora import segments_of
from lorax_server.adapters.manager import AdapterBudgetExceeded, AdapterInUse, AdapterManager, AdapterRequest
from lorax_server.adapters.sources import AdapterSource
from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine, RequestError
from lorax_server.forward import ForwardBatch
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model
from lorax_server.sampling import SamplingParams

BLOCK = 4
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "attn_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp_r8": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all_r16_rslora": dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR, use_rslora=True),
    "mixed_r64": dict(r=64, lora_alpha=24, target_modules=["k_proj", "o_proj", "up_proj"]),
}


@pytest.fixture(scope="module", params=["llama_dir", "mistral_dir"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    base_dir = request.getfixturevalue(request.param)
    tmp = tmp_path_factory.mktemp("adapters")
    dirs = {name: make_lora_adapter(base_dir, tmp / name, i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    engine, ref, indices = engine_and_peft(base_dir, dirs)
    return engine, ref, indices, dirs, base_dir


def engine_and_peft(base_dir: Path, dirs: dict[str, Path]) -> tuple[Engine, PeftModel, dict[str, int]]:
    """The engine (float32, CPU) with every adapter of `dirs` installed at indices 1, 2, ... in order,
    peft's model with the same adapters under their names, and the indices by name."""
    names = list(dirs)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        ref.load_adapter(dirs[name], adapter_name=name)
    ref.eval()
    model = load_model(base_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda adapter_id, source, token: Path(adapter_id), device_budget_bytes=2**30)
    engine = Engine(model, AutoTokenizer.from_pretrained(base_dir), CacheConfig(BLOCK, num_blocks=512), manager)
    engine.warmup(64, 256, 128)
    indices = {}
    for i, (name, d) in enumerate(dirs.items(), start=1):
        req = AdapterRequest(ids=(str(d),), source="local")
        manager.install(i, req, manager.prepare(req))
        indices[name] = i
    return engine, ref, indices


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def peft_greedy(ref: PeftModel, ids: list[int], adapter: str, n: int) -> list[int]:
    seq = torch.tensor([ids])
    for _ in range(n):
        nxt = ref(seq, adapter_names=[adapter]).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids) :].tolist()


# (adapter name or "__base__", prompt length); interleaved so sorting by adapter is exercised
MIX = [("mlp_r8", 9), ("__base__", 5), ("attn_r4", 12), ("mixed_r64", 3), ("all_r16_rslora", 7),
       ("attn_r4", 4), ("__base__", 10), ("mixed_r64", 8), ("all_r16_rslora", 2), ("mlp_r8", 6)]  # fmt: skip


@torch.no_grad()
def assert_prompt_logits_equal_peft(engine: Engine, ref: PeftModel, rows: list[tuple[str, int]], indices: dict) -> None:
    """Every prompt position's logits of one prefill over `rows` ((adapter or "__base__", prompt length),
    grouped by adapter as the engine orders a batch) against peft's, within 1e-4."""
    rows = sorted(rows, key=lambda row: indices.get(row[0], 0))
    prompts = [prompt(100 + i, n) for i, (_, n) in enumerate(rows)]
    lens = [len(p) for p in prompts]
    tables = [engine.blocks.allocate(n) for n in lens]
    width = max(len(t) for t in tables)
    meta = ForwardBatch.build(
        torch.tensor([t for p in prompts for t in p]),
        lens,
        lens,
        torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        BLOCK,
        logits_index=torch.arange(sum(lens)),
        lora_segments=segments_of([indices.get(name, 0) for name, _ in rows], lens),
    )
    got = engine.model.forward(meta, engine.cache).split(lens)
    for t in tables:
        engine.blocks.free(t)
    for (name, _), p, logits in zip(rows, prompts, got, strict=True):
        want = ref(torch.tensor([p]), adapter_names=[name]).logits[0]
        assert (logits - want).abs().max() < 1e-4, name


def test_mixed_batch_prefill_logits_equal_peft(setup) -> None:
    engine, ref, indices, _, _ = setup
    assert_prompt_logits_equal_peft(engine, ref, MIX, indices)


def greedy_tokens(engine: Engine, requests: list[RequestIn], batch_id: int) -> dict[int, list[int]]:
    """Each request's tokens from one continuous batch, prefilled together and decoded to the end."""
    tokens = {r.id: [] for r in requests}
    gens, batch = engine.prefill(batch_id, requests)
    while True:
        for g in gens:
            tokens[g.request_id].append(g.token_id)
        if batch is None:
            return tokens
        gens, batch = engine.decode([batch.id])


def test_mixed_batch_greedy_tokens_equal_peft(setup) -> None:
    engine, ref, indices, _, _ = setup
    requests = [
        RequestIn(i, prompt(200 + i, n), SamplingParams(), 10, ignore_eos=True, adapter_index=indices.get(name, 0))
        for i, (name, n) in enumerate(MIX)
    ]
    tokens = greedy_tokens(engine, requests, batch_id=1)
    base_tokens = {}
    for i, (name, _) in enumerate(MIX):
        want = peft_greedy(ref, requests[i].input_ids, name, 10)
        assert tokens[i] == want, (i, name)
        if name == "__base__":
            base_tokens[i] = want
    # The adapters matter: an adapter row differs from the base on the same prompt.
    plain = peft_greedy(ref, requests[0].input_ids, "__base__", 10)
    assert plain != tokens[0]


def test_continuous_batching_with_adapters_joining(setup) -> None:
    engine, ref, indices, _, _ = setup

    def req(rid: int, n: int, new: int, adapter: str | None = None) -> RequestIn:
        index = indices[adapter] if adapter else 0
        return RequestIn(rid, prompt(rid, n), SamplingParams(), new, ignore_eos=True, adapter_index=index)

    first = [req(1, 6, 8, "mixed_r64"), req(2, 4, 8)]
    second = [req(3, 5, 6, "attn_r4"), req(4, 7, 6, "mixed_r64")]
    tokens = {i: [] for i in range(1, 5)}

    def record(gens) -> None:  # noqa: ANN001
        for g in gens:
            tokens[g.request_id].append(g.token_id)

    gens, a = engine.prefill(10, first)
    record(gens)
    gens, a = engine.decode([a.id])
    record(gens)
    gens, b = engine.prefill(11, second)
    record(gens)
    batch = a
    gens, batch = engine.decode([a.id, b.id])
    record(gens)
    assert [engine.batches[batch.id].adapter_indices] == [sorted(engine.batches[batch.id].adapter_indices)]
    while batch is not None:
        gens, batch = engine.decode([batch.id])
        record(gens)
    names = {1: "mixed_r64", 2: "__base__", 3: "attn_r4", 4: "mixed_r64"}
    for r in first + second:
        assert tokens[r.id] == peft_greedy(ref, r.input_ids, names[r.id], r.max_new_tokens), r.id


def test_requests_for_an_unloaded_adapter_are_refused(setup) -> None:
    engine, *_ = setup
    with pytest.raises(RequestError, match="adapter index 42 is not loaded"):
        engine.prefill(20, [RequestIn(1, [5, 6], SamplingParams(), 2, adapter_index=42)])


def test_offload_and_reinstall(setup) -> None:
    engine, ref, indices, dirs, _ = setup
    manager = engine.adapters
    idx = indices["attn_r4"]
    req = AdapterRequest(ids=(str(dirs["attn_r4"]),), source="local")
    assert manager.offload(idx) and not manager.is_installed(idx)
    with pytest.raises(RequestError):
        engine.prefill(21, [RequestIn(1, [5, 6], SamplingParams(), 2, adapter_index=idx)])
    manager.install(idx, req, manager.prepare(req))  # from the host tier: no fetch needed
    ids = prompt(9, 5)
    gens, _ = engine.prefill(22, [RequestIn(1, ids, SamplingParams(), 1, ignore_eos=True, adapter_index=idx)])
    assert gens[0].token_id == peft_greedy(ref, ids, "attn_r4", 1)[0]


def test_merge_of_one_adapter_applies_its_weight(setup) -> None:
    """`merged_adapters` naming a single id scales that adapter (a linear merge of one), unlike a
    plain `adapter_id`."""
    engine, _, _, dirs, _ = setup
    manager = engine.adapters
    path = (str(dirs["mlp_r8"]),)
    plain = manager.prepare(AdapterRequest(ids=path, source="local"))
    half = manager.prepare(AdapterRequest(ids=path, source="local", weights=(0.5,), merge_strategy="linear"))
    assert plain.keys() == half.keys()
    for name, m in plain.items():
        assert torch.allclose(half[name].delta(), 0.5 * m.delta(), atol=1e-6), name


def test_host_cache_keeps_the_most_recent_within_its_budget(setup) -> None:
    """Factors read from disk (and merges) stay on the host, least recently used dropped first past
    `host_cache_bytes`; the newest always stays, however large."""
    engine, _, _, dirs, _ = setup
    fetched = []

    def fetch(adapter_id: str, source, token) -> Path:  # noqa: ANN001
        fetched.append(adapter_id)
        return Path(adapter_id)

    manager = AdapterManager(engine.model, fetch=fetch, device_budget_bytes=2**30)
    requests = {name: AdapterRequest(ids=(str(d),), source="local") for name, d in dirs.items()}
    sizes = {name: adapter_nbytes(manager._modules(r)) for name, r in requests.items()}
    names = list(requests)
    room = sizes[names[0]] + max(sizes[names[1]], sizes[names[2]])  # the first and one of the next two
    manager = AdapterManager(engine.model, fetch=fetch, device_budget_bytes=2**30, host_cache_bytes=room)
    fetched.clear()
    for name in names[:2]:
        manager.download(requests[name])
    manager.download(requests[names[0]])  # a hit: now the most recent
    assert fetched == [str(dirs[n]) for n in names[:2]]
    manager.download(requests[names[2]])  # over budget: the least recently used goes
    manager.download(requests[names[0]])
    manager.download(requests[names[1]])  # read again
    assert fetched[2:] == [str(dirs[names[2]]), str(dirs[names[1]])]
    manager.host_cache_bytes = 1  # smaller than any: only the newest stays
    merge = AdapterRequest(ids=(str(dirs[names[0]]),), source="local", weights=(0.5,), merge_strategy="linear")
    manager.download(merge)
    assert list(manager._host) == [merge.key]
    assert manager._host_bytes == adapter_nbytes(manager._host[merge.key])


def test_device_budget_is_enforced(setup) -> None:
    engine, _, _, dirs, _ = setup
    small = AdapterManager(engine.model, fetch=lambda a, s, t: Path(a), device_budget_bytes=1000)
    req = AdapterRequest(ids=(str(dirs["mixed_r64"]),), source="local")
    with pytest.raises(AdapterBudgetExceeded, match="adapter memory budget"):
        small.install(7, req, small.prepare(req))
    assert not small.installed
    # The router's fetch-and-load asks `if_fits`: an adapter that does not fit is left out, not refused.
    manager = engine.adapters
    budget = manager.device_budget_bytes
    manager.device_budget_bytes = manager.device_bytes + 1000
    try:
        assert not engine.install_adapter(7, req, manager.prepare(req), if_fits=True)
        assert not manager.is_installed(7)
    finally:
        manager.device_budget_bytes = budget
    assert engine.install_adapter(7, req, manager.prepare(req), if_fits=True) and manager.is_installed(7, req)
    assert engine.offload_adapter(7)


def test_small_adapters_on_the_host_or_a_local_disk_are_quick(setup, tmp_path: Path, monkeypatch) -> None:
    """Quick ones are fetched and prepared between steps; merges and remote fetches on a loader thread."""
    engine, _, _, dirs, _ = setup
    manager = engine.adapters
    on_host = AdapterRequest(ids=(str(dirs["attn_r4"]),), source="local")
    fresh = tmp_path / "fresh"
    shutil.copytree(dirs["mlp_r8"], fresh)
    on_disk = AdapterRequest(ids=(str(fresh),), source="local")
    assert manager.is_quick(on_host) and manager.is_quick(on_disk)
    assert manager.is_quick(AdapterRequest(ids=(str(fresh),), source="hub"))  # a hub id naming a directory
    assert not manager.is_quick(AdapterRequest(ids=("org/remote",), source="hub"))
    merge = AdapterRequest(ids=(str(fresh),), source="local", weights=(0.5,), merge_strategy="linear")
    assert not manager.is_quick(merge)
    manager.download(merge)
    assert manager.is_quick(merge)  # computed once, then on the host
    monkeypatch.setattr(adapter_manager, "QUICK_BYTES", 1000)
    assert not manager.is_quick(on_host) and not manager.is_quick(on_disk)


class TestBadAdapters:
    """Each problem gets a message that names it."""

    def _targets(self, setup):  # noqa: ANN202
        engine = setup[0]
        return engine.adapters.targets, engine.model.config.architecture

    def test_missing_files(self, setup, tmp_path: Path) -> None:
        targets, arch = self._targets(setup)
        with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
            load_lora_adapter(tmp_path, targets, arch, torch.float32)
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        with pytest.raises(AdapterLoadError, match="no adapter_model.safetensors"):
            load_lora_adapter(tmp_path, targets, arch, torch.float32)

    def test_corrupt_safetensors(self, setup, tmp_path: Path) -> None:
        targets, arch = self._targets(setup)
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
        with pytest.raises(AdapterLoadError, match="not a valid safetensors file"):
            load_lora_adapter(tmp_path, targets, arch, torch.float32)

    def test_shape_mismatch(self, setup, tmp_path: Path) -> None:
        targets, arch = self._targets(setup)
        other = make_llama(tmp_path / "wide", hidden_size=96, intermediate_size=160)
        adapter = make_lora_adapter(other, tmp_path / "wide_adapter", 0, r=4, target_modules=["q_proj"])
        with pytest.raises(AdapterLoadError, match="shape mismatch for model.layers.0.self_attn.q_proj"):
            load_lora_adapter(adapter, targets, arch, torch.float32)

    def test_unsupported_module_and_features(self, setup, tmp_path: Path) -> None:
        targets, arch = self._targets(setup)
        base_dir = setup[4]
        adapter = make_lora_adapter(base_dir, tmp_path / "emb", 0, r=4, target_modules=["embed_tokens", "q_proj"])
        with pytest.raises(AdapterLoadError, match="embed_tokens"):
            load_lora_adapter(adapter, targets, arch, torch.float32)
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        for key, value, message in [("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "modules_to_save"),
                                    ("peft_type", "IA3", "only LoRA")]:  # fmt: skip
            (adapter / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
            with pytest.raises(AdapterLoadError, match=message):
                load_lora_adapter(adapter, targets, arch, torch.float32)


def test_adapter_swaps_wait_for_the_requests_that_use_the_index(setup) -> None:
    """The engine's rules: an index that a cached batch uses is neither emptied nor given another
    adapter; loading the same adapter again is a no-op; index 0 is the base model."""
    engine, _, indices, dirs, _ = setup
    idx = indices["mlp_r8"]
    own = AdapterRequest(ids=(str(dirs["mlp_r8"]),), source=AdapterSource.LOCAL)
    other = AdapterRequest(ids=(str(dirs["attn_r4"]),), source=AdapterSource.LOCAL)
    assert engine.adapter_loaded(idx, own) and not engine.adapter_loaded(idx, other)
    assert 0 < engine.download_adapter(other) < 1
    with pytest.raises(RequestError, match="base model"):
        engine.adapter_loaded(0, own)
    request = RequestIn(1, prompt(4, 5), SamplingParams(), 4, ignore_eos=True, adapter_index=idx)
    _, batch = engine.prefill(30, [request])
    with pytest.raises(AdapterInUse, match="used by running requests"):
        engine.offload_adapter(idx)
    with pytest.raises(AdapterInUse, match="another adapter"):
        engine.install_adapter(idx, other, engine.prepare_adapter(other))
    engine.install_adapter(idx, own, engine.prepare_adapter(own))  # the same adapter again
    engine.clear(batch.id)
    assert engine.offload_adapter(idx) and not engine.offload_adapter(idx)
    engine.install_adapter(idx, own, engine.prepare_adapter(own))
    assert engine.adapter_loaded(idx, own)
