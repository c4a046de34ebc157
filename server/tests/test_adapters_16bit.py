"""Adapters stored in bfloat16 or float16 on a float32 model: their factors stay 16-bit (half the memory),
the CPU kernel reads them as they are when a batch's adapters share one dtype, and outputs equal peft's
(which widens them to float32 on load): prefill logits and greedy tokens, alone and mixed with other
dtypes, and merges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_adapters import (
    ALL_LINEAR,
    assert_prompt_logits_equal_peft,
    engine_and_peft,
    greedy_tokens,
    peft_greedy,
    prompt,
)
from tiny_models import make_lora_adapter

from lorax_server.adapters import lora_cpu
from lorax_server.adapters.loader import adapter_nbytes
from lorax_server.adapters.lora import kept_dtype
from lorax_server.adapters.manager import AdapterRequest
from lorax_server.batch import RequestIn
from lorax_server.engine import Engine
from lorax_server.sampling import SamplingParams

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
    engine, ref, indices = engine_and_peft(llama_dir, dirs)
    return engine, ref, indices, dirs


def assert_greedy_tokens_equal_peft(setup, rows: list[tuple[str, int]], batch_id: int) -> None:  # noqa: ANN001
    """One continuous batch of (adapter or "__base__", prompt length) rows, 8 tokens each, against peft."""
    engine, ref, indices, _ = setup
    requests = [
        RequestIn(i, prompt(300 + i, n), SamplingParams(), 8, ignore_eos=True, adapter_index=indices.get(name, 0))
        for i, (name, n) in enumerate(rows)
    ]
    tokens = greedy_tokens(engine, requests, batch_id)
    for r, (name, _) in zip(requests, rows, strict=True):
        assert tokens[r.id] == peft_greedy(ref, r.input_ids, name, 8), (r.id, name)


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
    assert_greedy_tokens_equal_peft(setup, rows, batch_id=1)
    assert kept_stack_dtypes(engine) == {torch.bfloat16}  # the kernel read the factors as stored
    assert_prompt_logits_equal_peft(engine, ref, rows, indices)
    assert kept_stack_dtypes(engine) == {torch.bfloat16}


def test_mixed_dtypes_in_one_batch_equal_peft(setup) -> None:
    """bfloat16, float16 and float32 adapters together: the stacks widen to float32."""
    engine = setup[0]
    rows = [("f16_all", 7), ("bf16_all_rslora", 4), ("__base__", 6), ("f32_attn", 10), ("bf16_qkv_down", 3)]
    assert_greedy_tokens_equal_peft(setup, rows, batch_id=3)
    assert kept_stack_dtypes(engine) == {torch.float32}


def test_merges_of_16_bit_adapters_are_float32(setup) -> None:
    engine, _, _, dirs = setup
    manager = engine.adapters
    path = (str(dirs["bf16_all_rslora"]),)
    plain = manager.prepare(AdapterRequest(ids=path, source="local"))
    half = manager.prepare(AdapterRequest(ids=path, source="local", weights=(0.5,), merge_strategy="linear"))
    for name, m in plain.items():
        assert half[name].lora_a.dtype == half[name].lora_b.dtype == torch.float32
        torch.testing.assert_close(half[name].delta(), 0.5 * m.delta(), atol=1e-6, rtol=1e-6)
