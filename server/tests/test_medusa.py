"""Medusa adapters (LoRAX's format): loaded alone or beside a LoRA, checked against the base model,
and drafting for speculative decoding without changing a single output, in batches that mix them with
prompt lookup, LoRA adapters and the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_speculation import BLOCK, compare, copy_heavy
from tiny_models import make_lora_adapter
from transformers import AutoTokenizer

from lorax_server.adapters.loader import MEDUSA, AdapterLoadError, load_adapter
from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.adapters.medusa import MedusaHeads
from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model
from lorax_server.sampling import SamplingParams
from lorax_server.speculation import SpeculationConfig, Speculator

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "demo"


def write_medusa(out: Path, hidden: int, vocab: int, heads: int, layers: int = 1, own_head: bool = False,
                 seed: int = 0, scale: float = 0.02) -> Path:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(heads):
        for j in range(layers):
            tensors[f"{i}.{j}.linear.weight"] = torch.randn(hidden, hidden, generator=g) * scale
            tensors[f"{i}.{j}.linear.bias"] = torch.randn(hidden, generator=g) * scale
        if own_head:
            tensors[f"{i}.{layers}.weight"] = torch.randn(vocab, hidden, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "medusa_lm_head.safetensors"))
    config = {"medusa_num_heads": heads, "medusa_num_layers": layers, "version": 1 if own_head else 2}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def setup(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("medusa")
    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    cfg = model.config
    v2 = write_medusa(tmp / "v2", cfg.hidden_size, cfg.vocab_size, heads=3)
    v1 = write_medusa(tmp / "v1", cfg.hidden_size, cfg.vocab_size, heads=4, layers=2, own_head=True, seed=1)
    both = make_lora_adapter(llama_dir, tmp / "both", 3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    write_medusa(both, cfg.hidden_size, cfg.vocab_size, heads=2, seed=2)
    lora = make_lora_adapter(llama_dir, tmp / "lora", 4, r=8, lora_alpha=16, target_modules=["o_proj"])
    manager = AdapterManager(model, fetch=lambda adapter_id, source, token: Path(adapter_id), device_budget_bytes=2**30)
    engine = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(BLOCK, num_blocks=1024), manager)
    engine.warmup(96, 512, 160)
    for index, d in enumerate([v2, v1, both, lora], start=1):
        req = AdapterRequest(ids=(str(d),), source="local")
        manager.install(index, req, manager.prepare(req))
    return engine, manager, {"v2": v2, "v1": v1, "both": both, "lora": lora}


def test_loading_checks_the_heads_against_the_base(setup, tmp_path: Path) -> None:
    engine, manager, dirs = setup
    cfg = engine.model.config
    heads = load_adapter(dirs["v1"], manager.targets, cfg, torch.float32)
    assert set(heads) == {MEDUSA} and heads[MEDUSA].num_heads == 4 and heads[MEDUSA].out is not None
    both = load_adapter(dirs["both"], manager.targets, cfg, torch.float32)
    assert MEDUSA in both and len(both) > 1  # LoRA factors beside the heads
    assert set(manager.medusa) == {1, 2, 3}
    wrong = write_medusa(tmp_path / "wrong", cfg.hidden_size + 1, cfg.vocab_size, heads=2)
    with pytest.raises(AdapterLoadError, match="shape"):
        load_adapter(wrong, manager.targets, cfg, torch.float32)
    (wrong / "medusa_lm_head.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="without its weights"):
        load_adapter(wrong, manager.targets, cfg, torch.float32)
    with pytest.raises(AdapterLoadError, match="cannot be merged"):
        manager.download(AdapterRequest(ids=(str(dirs["v2"]), str(dirs["lora"])), source="local",
                                        merge_strategy="linear"))  # fmt: skip


def test_medusa_and_lookup_rows_mixed_identical(setup) -> None:
    engine, _, _ = setup
    reqs = [RequestIn(id=i, input_ids=copy_heavy(i, 10 + 3 * i), sampling=SamplingParams(), max_new_tokens=24,
                      ignore_eos=True, adapter_index=i % 5, top_n_tokens=2) for i in range(10)]  # fmt: skip
    spec = compare(engine, reqs, refusals=False)
    assert spec.drafted_tokens > 0


def test_medusa_without_prompt_lookup(setup) -> None:
    """--speculative-tokens 0: only the rows whose adapter has heads draft."""
    engine, manager, _ = setup
    reqs = [RequestIn(id=i, input_ids=copy_heavy(i, 12), sampling=SamplingParams(), max_new_tokens=20,
                      ignore_eos=True, adapter_index=i % 5) for i in range(5)]  # fmt: skip
    plain = {}
    engine.speculator = None
    gens, batch = engine.prefill(30, reqs)
    while True:
        for g in gens:
            plain.setdefault(g.request_id, []).append(g.token_id)
        if batch is None:
            break
        gens, batch = engine.decode([batch.id])
    engine.speculator = Speculator(SpeculationConfig(0), engine.model, engine.emitter, manager)
    got = {}
    gens, batch = engine.prefill(31, reqs)
    while True:
        for g in gens:
            got.setdefault(g.request_id, []).append(g)
            assert not g.skipped or reqs[g.request_id].adapter_index in manager.medusa
        if batch is None:
            break
        gens, batch = engine.decode([batch.id])
    assert {r: [g.token_id for g in gs] for r, gs in got.items()} == plain
    assert engine.speculator.drafted_tokens > 0


def test_trained_demo_heads_draft_what_the_demo_model_says() -> None:
    """The committed demo Medusa heads (scripts/train_demo_medusa.py) beside the demo LoRA adapters and
    the base, greedy and seeded: the same answers as without speculation, in fewer decode steps."""
    model = load_model(DEMO, TorchAttention(16), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda adapter_id, source, token: Path(adapter_id), device_budget_bytes=2**30)
    engine = Engine(model, AutoTokenizer.from_pretrained(DEMO), CacheConfig(16, num_blocks=256), manager)
    engine.warmup(128, 512, 192)
    for index, name in enumerate(["medusa", "upper", "answer-format"], start=1):
        req = AdapterRequest(ids=(str(DEMO / "adapters" / name),), source="local")
        manager.install(index, req, manager.prepare(req))
    assert isinstance(manager.medusa[1], MedusaHeads) and set(manager.medusa) == {1}
    tok = AutoTokenizer.from_pretrained(DEMO)
    prompts = ["Q: Copy: blue fox\nA: blue fox\nQ: What is 2 + 3?\nA: 5\nQ: Copy: red cat\nA:",
               "Q: What colour is the sky on Zorb?\nA:", "Q: Copy: tall man\nA:"]  # fmt: skip
    seeded = SamplingParams(do_sample=True, temperature=0.6, seed=5)
    reqs = [
        RequestIn(id=i, input_ids=tok(prompts[i % 3])["input_ids"], sampling=seeded if i % 4 == 3 else SamplingParams(),
                  max_new_tokens=40, ignore_eos=True, adapter_index=[1, 1, 2, 1, 3, 0][i])
        for i in range(6)
    ]  # fmt: skip
    spec = compare(engine, reqs, refusals=False)
    assert spec.accepted_tokens > 0


def test_sources_fetch_medusa_directories(setup, tmp_path: Path) -> None:
    from lorax_server.adapters.sources import AdapterFetchError, fetch_adapter, select_adapter_files

    _, _, dirs = setup
    assert fetch_adapter(str(dirs["v2"]), "local") == dirs["v2"]
    listed = ["config.json", "medusa_lm_head.safetensors", "README.md", "adapter_config.json",
              "adapter_model.safetensors"]  # fmt: skip
    assert set(select_adapter_files(listed)) == set(listed) - {"README.md"}
    base_like = tmp_path / "model"
    base_like.mkdir()
    (base_like / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(AdapterFetchError, match="not a PEFT adapter"):
        fetch_adapter(str(base_like), "local")


def test_the_default_adapters_heads_draft_for_requests_without_their_own(setup) -> None:
    """As in LoRAX: with a Medusa adapter as the server's default, requests on a LoRA without heads (and
    on the base) draft with the default's heads; an adapter's own heads come first."""
    from lorax_server.adapters.sources import AdapterSource

    engine, manager, dirs = setup
    assert manager.medusa_for(4) is None
    manager.default_adapter = (str(dirs["v2"]), AdapterSource.LOCAL)
    request = AdapterRequest(ids=(str(dirs["v2"]),), source="local")
    manager.install(1, request, manager.prepare(request))
    try:
        assert manager.default_index == 1
        assert manager.medusa_for(4) is manager.medusa[1] and manager.medusa_for(0) is manager.medusa[1]
        assert manager.medusa_for(2) is manager.medusa[2]
        reqs = [RequestIn(id=i, input_ids=copy_heavy(i, 12), sampling=SamplingParams(), max_new_tokens=16,
                          ignore_eos=True, adapter_index=[4, 0, 2][i]) for i in range(3)]  # fmt: skip
        compare(engine, reqs, refusals=False)
    finally:
        manager.default_adapter = manager.default_index = None
