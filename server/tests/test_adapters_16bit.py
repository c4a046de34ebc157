"""Adapters stored in bfloat16 or float16 on a float32 model: their factors stay 16-bit (half the memory),
the CPU kernel reads them as they are when a batch's adapters share one dtype, and outputs equal peft's
(which widens them to float32 on load): prefill logits and greedy tokens, alone and mixed with other
dtypes, and merges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_adapters import peft_greedy, prompt
from tiny_models import make_lora_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.adapters import lora_cpu
from lorax_server.adapters.loader import adapter_nbytes
from lorax_server.adapters.lora import kept_dtype, segments_of
from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine
from lorax_server.forward import ForwardBatch
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model
from lorax_server.sampling import SamplingParams

BLOCK = 4
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name → (stored dtype, LoraConfig); scales that 16 bits cannot hold exactly (rslora: 16/√8)
    "bf16_all_rslora": (torch.bfloat16, dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=True)),
    "bf16_qkv_down": (torch.bfloat16, dict(r=16, lora_alpha=20.6, target_modules=["q_proj", "v_proj", "down_proj"])),
    "f16_all": (torch.float16, dict(r=4, lora_alpha=7, target_modules=ALL_LINEAR)),
    "f32_attn": (None, dict(r=8, lora_alpha=13, target_modules=["q_proj", "v_proj", "o_proj"])),
}  # fmt: skip


@pytest.fixture(scope="module")
def setup(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("adapters16")
    dirs = {
        name: make_lora_adapter(llama_dir, tmp / name, 40 + i, stored_dtype=dtype, **kw)
        for i, (name, (dtype, kw)) in enumerate(ADAPTERS.items())
    }
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    names = list(dirs)
    ref = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        ref.load_adapter(dirs[name], adapter_name=name)
    ref.eval()
    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda adapter_id, source, token: Path(adapter_id), device_budget_bytes=2**30)
    engine = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(BLOCK, num_blocks=256), manager)
    engine.warmup(32, 128, 64)
    indices = {}
    for i, (name, d) in enumerate(dirs.items(), start=1):
        req = AdapterRequest(ids=(str(d),), source="local")
        manager.install(i, req, manager.prepare(req))
        indices[name] = i
    return engine, ref, indices, dirs


def generate(engine: Engine, rows: list[tuple[str, int]], indices: dict[str, int], batch_id: int) -> dict[int, list]:
    """Greedy tokens of one continuous batch of (adapter or "__base__", prompt length) rows."""
    requests = [
        RequestIn(i, prompt(300 + i, n), SamplingParams(), 8, ignore_eos=True, adapter_index=indices.get(name, 0))
        for i, (name, n) in enumerate(rows)
    ]
    tokens = {r.id: [] for r in requests}
    gens, batch = engine.prefill(batch_id, requests)
    while True:
        for g in gens:
            tokens[g.request_id].append(g.token_id)
        if batch is None:
            return {r.id: (r.input_ids, tokens[r.id]) for r in requests}
        gens, batch = engine.decode([batch.id])


@torch.no_grad()
def prompt_logits(engine: Engine, rows: list[tuple[str, int]], indices: dict[str, int]) -> tuple[list, list]:
    """Every prompt position's logits of one prefill over `rows` (grouped by adapter, as the engine
    sorts them): (prompts, logits per row)."""
    prompts = [prompt(500 + i, n) for i, (_, n) in enumerate(rows)]
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
    logits = engine.model.forward(meta, engine.cache).split(lens)
    for t in tables:
        engine.blocks.free(t)
    return prompts, logits


def kept_stack_dtypes(engine: Engine) -> set[torch.dtype]:
    return {slots._stacked.a.dtype for slots in engine.adapters._slots.values() if slots._stacked is not None}


def test_factors_stay_16_bit_on_a_float32_model(setup) -> None:
    engine, _, _, dirs = setup
    assert kept_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert kept_dtype(torch.float16, torch.float32) == torch.float16
    assert kept_dtype(torch.float32, torch.float32) == torch.float32
    assert kept_dtype(torch.float32, torch.bfloat16) == torch.bfloat16  # a 16-bit model: its own dtype
    assert kept_dtype(torch.float16, torch.bfloat16) == torch.bfloat16
    modules = engine.adapters._modules(AdapterRequest(ids=(str(dirs["bf16_all_rslora"]),), source="local"))
    assert {m.lora_a.dtype for m in modules.values()} == {m.lora_b.dtype for m in modules.values()} == {torch.bfloat16}
    elements = sum(m.lora_a.numel() + m.lora_b.numel() for m in modules.values())
    assert adapter_nbytes(modules) == 2 * elements  # half the memory of float32 factors


@pytest.mark.skipif(lora_cpu.EXTENSION.ops() is None, reason="the CPU kernel did not build")
def test_bfloat16_adapters_run_in_16_bit_stacks_and_equal_peft(setup) -> None:
    engine, ref, indices, _ = setup
    rows = [("bf16_all_rslora", 9), ("__base__", 5), ("bf16_qkv_down", 12), ("bf16_all_rslora", 3),
            ("bf16_qkv_down", 6)]  # fmt: skip
    got = generate(engine, rows, indices, batch_id=1)
    assert kept_stack_dtypes(engine) == {torch.bfloat16}  # the kernel read the factors as stored
    for i, (name, _) in enumerate(rows):
        ids, tokens = got[i]
        assert tokens == peft_greedy(ref, ids, name, 8), (i, name)
    grouped = sorted(rows, key=lambda row: indices.get(row[0], 0))  # as the engine orders a batch's rows
    for (name, _), p, logits in zip(grouped, *prompt_logits(engine, grouped, indices), strict=True):
        want = ref(torch.tensor([p]), adapter_names=[name]).logits[0]
        assert (logits - want).abs().max() < 1e-4, name


def test_mixed_dtypes_in_one_batch_equal_peft(setup) -> None:
    """bfloat16, float16 and float32 adapters together: the stacks widen to float32."""
    engine, ref, indices, _ = setup
    rows = [("f16_all", 7), ("bf16_all_rslora", 4), ("__base__", 6), ("f32_attn", 10), ("bf16_qkv_down", 3)]
    got = generate(engine, rows, indices, batch_id=3)
    assert kept_stack_dtypes(engine) == {torch.float32}
    for i, (name, _) in enumerate(rows):
        ids, tokens = got[i]
        assert tokens == peft_greedy(ref, ids, name, 8), (i, name)


def test_merges_of_16_bit_adapters_are_float32(setup) -> None:
    engine, _, _, dirs = setup
    manager = engine.adapters
    path = (str(dirs["bf16_all_rslora"]),)
    plain = manager.prepare(AdapterRequest(ids=path, source="local"))
    half = manager.prepare(AdapterRequest(ids=path, source="local", weights=(0.5,), merge_strategy="linear"))
    for name, m in plain.items():
        assert half[name].lora_a.dtype == half[name].lora_b.dtype == torch.float32
        torch.testing.assert_close(half[name].delta(), 0.5 * m.delta(), atol=1e-6, rtol=1e-6)
