"""Quantized base models (`--quantize`): our logits equal those of a `transformers` model whose linear
weights are the dequantization of the same quantized tensors, computed here independently of our code
from the format's definition; LoRA adapters on a quantized base equal peft on that reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import FAMILIES, LORA_KWARGS, build_family
from peft import PeftModel
from quantized import fake_int8, quantized_linears, reference_checkpoint
from ragged_runs import assert_matches, prompts, run_ours
from tiny_models import make_lora_adapter
from transformers import AutoModelForCausalLM

from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.quant.int8 import quantize_eetq
from lorax_server.models.loader import load_model

LENGTHS = [7, 3, 12, 5]
STEPS = 8
NAMED = ["llama", "mixtral", "dbrx", "gpt2", "phi3", "bloom", "gemma2", "qwen2", "cohere", "phi"]


@pytest.fixture(scope="module", params=NAMED)
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp(f"q_{request.param}")
    model_dir, _ = build_family(request.param, tmp / "base")
    ours = load_model(model_dir, TorchAttention(4), torch.device("cpu"), "float32", quantize="eetq")
    ref_dir = reference_checkpoint(model_dir, ours, tmp / "reference")
    return request.param, model_dir, ours, ref_dir


def test_int8_format_matches_its_definition() -> None:
    w = torch.randn(24, 40) * torch.linspace(0.01, 3, 24)[:, None]
    w[5] = 0  # an all-zero row keeps a finite scale
    q = quantize_eetq(w)
    assert q.codes.dtype == torch.uint8 and q.bits == 8
    assert torch.equal(q.dequantize(), fake_int8(w, 0))
    x = torch.randn(6, 40)
    assert (q.matmul(x) - x @ q.dequantize().t()).abs().max() < 1e-4
    assert q.nbytes() == 24 * 40 + 24 * 4  # a byte per weight and a float32 scale per output channel


def test_quantized_family_equals_transformers_on_dequantized_weights(quantized) -> None:
    family, _, ours, ref_dir = quantized
    # Embeddings, norms and the LM head stay dense; every other linear is quantized, none is left dense.
    assert not ours.lm_head.quantized
    assert quantized_linears(ours)
    dense_left = [
        name
        for layer in ours.layers
        for module in layer.linears()
        for linear in (module if isinstance(module, list) else [module])
        if not linear.quantized
        for name in linear.part_names
        if not name.endswith((".gate", ".router.layer"))  # the MoE router stays dense
    ]
    assert not dense_left, dense_left
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    batch = prompts(ours.config.vocab_size, LENGTHS)
    out = run_ours(ours, batch, STEPS)
    for row, prompt in enumerate(batch):
        assert_matches(out, row, ref, prompt)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_adapters_on_a_quantized_base_equal_peft(family: str, tmp_path: Path) -> None:
    _, model_name, _, targets = FAMILIES[family]
    model_dir, _ = build_family(family, tmp_path / "base")
    adapters = [
        make_lora_adapter(
            model_dir,
            tmp_path / f"lora{i}",
            i,
            r=8 * (i + 1),
            lora_alpha=16,
            target_modules=t,
            **LORA_KWARGS.get(model_name, {}),
        )  # fmt: skip
        for i, t in enumerate(targets)
    ]
    ours = load_model(model_dir, TorchAttention(4), torch.device("cpu"), "float32", quantize="eetq")
    ref_dir = reference_checkpoint(model_dir, ours, tmp_path / "reference")
    manager = AdapterManager(ours, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for index, path in enumerate(adapters, start=1):
        request = AdapterRequest(ids=(str(path),), source="local")
        manager.install(index, request, manager.prepare(request))
    batch = prompts(ours.config.vocab_size, LENGTHS)
    rows = [0, 1, 2, 1]  # base, adapter 1, adapter 2, adapter 1
    out = run_ours(ours, batch, STEPS, adapters=rows)
    for row, (prompt, adapter) in enumerate(zip(batch, rows, strict=True)):
        ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
        if adapter:
            ref = PeftModel.from_pretrained(ref, adapters[adapter - 1]).eval()
        assert_matches(out, row, ref, prompt)


def test_quantized_weights_take_a_quarter_of_the_bytes(quantized) -> None:
    _, _, ours, _ = quantized
    linears = quantized_linears(ours)
    dense_bytes = sum(lin.weight.out_features * lin.weight.in_features * 4 for lin in linears)
    packed = sum(lin.weight.nbytes() for lin in linears)
    assert packed <= 0.27 * dense_bytes, (packed, dense_bytes)
