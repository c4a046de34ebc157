"""Every `--quantize` method that runs on CPU, model by model: prefill and decode logits of a ragged batch
equal a `transformers` model whose linear weights are the dequantization of the same quantized tensors
(< 1e-4, float32). Pre-quantized checkpoints (GPTQ, AWQ, FP8) are written by the tests' own packers;
load-time methods use their `dequantize()`, which test_quant_formats.py checks against bitsandbytes,
torch's float8 casts and the formats' definitions. Adapters (fp32, fp16 and bf16 files) on GPTQ and nf4
bases equal peft on the dequantized reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, LORA_KWARGS, build_family
from peft import PeftModel
from quant_packers import awq_pack, gptq_checkpoint, write_prequantized
from quantized import dequantized_checkpoint, quantized_linears
from ragged_runs import assert_matches, prompts, run_ours
from safetensors.torch import load_file, save_file
from tiny_models import make_lora_adapter
from transformers import AutoModelForCausalLM

from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.quant import QuantizationError
from lorax_server.layers.quant.fp8 import E4M3_MAX
from lorax_server.models.loader import load_model

LENGTHS = [7, 3, 12, 5]
STEPS = 6
NAMED = ["llama", "mixtral", "dbrx", "gpt2", "phi3", "bloom", "gemma2", "qwen2", "cohere", "phi"]
CPU = torch.device("cpu")


def _load(model_dir: Path, quantize: str | None = None):  # noqa: ANN202
    return load_model(model_dir, TorchAttention(4), CPU, "float32", quantize=quantize)


def _assert_equal_to_reference(ours, ref_dir: Path, adapters: list[int] | None = None, peft_dirs=()) -> None:  # noqa: ANN001
    batch = prompts(ours.config.vocab_size, LENGTHS)
    out = run_ours(ours, batch, STEPS, adapters=adapters)
    for row, prompt in enumerate(batch):
        ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
        adapter = adapters[row] if adapters else 0
        if adapter:
            ref = PeftModel.from_pretrained(ref, peft_dirs[adapter - 1]).eval()
        assert_matches(out, row, ref, prompt)


@pytest.mark.parametrize("family", NAMED)
@pytest.mark.parametrize("method", ["bitsandbytes-nf4", "gptq"])
def test_every_family_quantized(family: str, method: str, tmp_path: Path) -> None:
    model_dir, _ = build_family(family, tmp_path / "base")
    if method == "gptq":
        quantized_dir, ref_dir = gptq_checkpoint(model_dir, tmp_path)
        ours = _load(quantized_dir)  # detected from quantization_config, no --quantize needed
    else:
        ours = _load(model_dir, method)
        ref_dir = dequantized_checkpoint(model_dir, ours, tmp_path / "reference")
    assert quantized_linears(ours)
    assert not ours.lm_head.quantized and isinstance(ours.embed, torch.Tensor)
    _assert_equal_to_reference(ours, ref_dir)


@pytest.mark.parametrize("method", ["bitsandbytes", "bitsandbytes-fp4", "hqq-4bit", "hqq-3bit", "hqq-2bit", "fp8"])
def test_load_time_methods(method: str, tmp_path: Path) -> None:
    """(fp8-kv's float8 weights are fp8's; its KV cache is tested in test_fp8_kv.py.)"""
    family = "mixtral" if method in ("hqq-4bit", "fp8") else "llama"  # experts too
    model_dir, _ = build_family(family, tmp_path / "base")
    ours = _load(model_dir, method)
    _assert_equal_to_reference(ours, dequantized_checkpoint(model_dir, ours, tmp_path / "reference"))


@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(2, 16, False), (3, -1, True), (8, 64, False)])
def test_gptq_bits_and_groups(bits: int, group_size: int, act_order: bool, tmp_path: Path) -> None:
    model_dir, _ = build_family("llama", tmp_path / "base")
    quantized_dir, ref_dir = gptq_checkpoint(model_dir, tmp_path, bits, group_size, act_order)
    _assert_equal_to_reference(_load(quantized_dir, "gptq"), ref_dir)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_awq_checkpoints(family: str, tmp_path: Path) -> None:
    model_dir, _ = build_family(family, tmp_path / "base")
    dense = _load(model_dir)
    quantized_dir, ref_dir = write_prequantized(model_dir, dense, tmp_path / "awq", tmp_path / "reference", "awq",
                                                {"bits": 4, "group_size": 32, "version": "gemm", "zero_point": True},
                                                lambda w: awq_pack(w, 32))  # fmt: skip
    _assert_equal_to_reference(_load(quantized_dir, "awq"), ref_dir)


def test_fp8_checkpoint_loads_as_stored(tmp_path: Path) -> None:
    model_dir, _ = build_family("llama", tmp_path / "base")
    dense = _load(model_dir)

    def fp8(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
        values = (w / scale).to(torch.float8_e4m3fn)
        return {"weight": values, "weight_scale": scale}, values.float() * scale

    quantized_dir, ref_dir = write_prequantized(model_dir, dense, tmp_path / "fp8", tmp_path / "reference",
                                                "compressed-tensors", {}, fp8)  # fmt: skip
    ours = _load(quantized_dir)
    assert quantized_linears(ours)
    _assert_equal_to_reference(ours, ref_dir)


def _adapter_in(dtype: torch.dtype, path: Path) -> Path:
    """The adapter's weights re-saved in `dtype` (adapters ship as fp32, fp16 or bf16 files)."""
    file = path / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(file)).items()}, str(file))
    return path


@pytest.mark.parametrize("method", ["gptq", "bitsandbytes-nf4"])
def test_adapters_of_three_precisions_on_a_quantized_base_equal_peft(method: str, tmp_path: Path) -> None:
    _, model_name, _, targets = FAMILIES["llama"]
    model_dir, _ = build_family("llama", tmp_path / "base")
    adapters = [
        _adapter_in(dtype, make_lora_adapter(model_dir, tmp_path / f"lora{i}", i, r=r, lora_alpha=16,
                                             target_modules=t, **LORA_KWARGS.get(model_name, {})))
        for i, (dtype, r, t) in enumerate([(torch.float32, 8, targets[0]), (torch.float16, 16, targets[1]),
                                           (torch.bfloat16, 8, targets[0] + targets[1])])
    ]  # fmt: skip
    if method == "gptq":
        quantized_dir, ref_dir = gptq_checkpoint(model_dir, tmp_path)
        ours = _load(quantized_dir, "gptq")
    else:
        ours = _load(model_dir, method)
        ref_dir = dequantized_checkpoint(model_dir, ours, tmp_path / "reference")
    manager = AdapterManager(ours, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for index, path in enumerate(adapters, start=1):
        request = AdapterRequest(ids=(str(path),), source="local")
        manager.install(index, request, manager.prepare(request))
    _assert_equal_to_reference(ours, ref_dir, adapters=[0, 1, 2, 3], peft_dirs=adapters)


def test_gptq_requested_for_a_full_precision_checkpoint_names_the_missing_tensor(tmp_path: Path) -> None:
    model_dir, _ = build_family("llama", tmp_path / "base")
    with pytest.raises(QuantizationError, match=r"tensor 'model.layers.0.self_attn.q_proj.qweight' is missing"):
        _load(model_dir, "gptq")


def test_a_method_contradicting_the_checkpoint_is_refused(tmp_path: Path) -> None:
    model_dir, _ = build_family("llama", tmp_path / "base")
    quantized_dir, _ = gptq_checkpoint(model_dir, tmp_path)
    with pytest.raises(QuantizationError, match="--quantize awq contradicts the checkpoint"):
        _load(quantized_dir, "awq")
    config = json.loads((quantized_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"


def test_the_transformers_fallback_cannot_be_quantized(tmp_path: Path) -> None:
    import transformers
    from tiny_models import make_model

    model_dir = make_model(transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, tmp_path / "neox",
                           num_key_value_heads=None)  # fmt: skip
    with pytest.raises(QuantizationError, match="served by the transformers fallback, which cannot be quantized"):
        _load(model_dir, "bitsandbytes-nf4")


DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
# Floors on the trained demo model's top-1 agreement with float32 (teacher-forced on float32's greedy
# answers): 8-bit formats round within half a step of 1/127 of a channel's range and should change
# almost nothing; 4-bit ones round to 16 levels per block and may flip near-ties. bench/quantization.py
# prints the measured values of every method.
QUALITY_FLOORS = {"eetq": 0.99, "fp8": 0.97, "bitsandbytes-nf4": 0.9, "hqq-4bit": 0.9}


@pytest.mark.parametrize("method", sorted(QUALITY_FLOORS))
def test_quantized_demo_model_agrees_with_float32(method: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    questions = [f"Q: What is {a} + {b}?\nA:" for a in (2, 7, 11, 19) for b in (0, 5, 13)]
    questions += [f"Q: What is {a} - {b}?\nA:" for a in (12, 20) for b in (3, 9)] + ["Q: Copy: apple river\nA:"]
    ids = [torch.tensor(tok(q).input_ids) for q in questions]
    answers = run_ours(_load(DEMO), ids, 6)[1].argmax(-1)  # [questions, 6] float32 greedy tokens
    forced = [torch.cat([i, a[:-1]]) for i, a in zip(ids, answers, strict=True)]
    prefill, _ = run_ours(_load(DEMO, method), forced, 1)
    predicted = torch.stack([logits[-answers.shape[1] :].argmax(-1) for logits in prefill])
    agreement = (predicted == answers).float().mean().item()
    assert agreement >= QUALITY_FLOORS[method], agreement
