"""`--merge-adapter-weights`: one adapter folded into the base weights at start equals peft's model with
that adapter (prompt logits < 1e-4, greedy tokens), for dense and oneDNN-packed weights, fused q|k|v and
gate|up parts, 16-bit adapter files, and a tied embedding that must stay the base model's. Adapters the
base cannot take exactly are refused before any weight changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_adapters import ALL_LINEAR, BLOCK, assert_prompt_logits_equal_peft, greedy_tokens, peft_greedy, prompt
from tiny_models import make_lora_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.adapters.loader import AdapterLoadError
from lorax_server.adapters.merge_into_base import merge_into_base
from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine
from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.packed import PackedWeight
from lorax_server.models.loader import load_model
from lorax_server.sampling import SamplingParams


def _merged_engine(base_dir: Path, adapter_dir: Path, packed: bool, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("LORAX_PACKED_WEIGHTS", "1" if packed else "0")
    model = load_model(base_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    assert any(isinstance(linear.weight, PackedWeight) for linear in model.linears()) == packed
    merge_into_base(model, adapter_dir)
    engine = Engine(model, AutoTokenizer.from_pretrained(base_dir), CacheConfig(BLOCK, num_blocks=256))
    engine.warmup(64, 256, 128)
    return engine


def _peft(base_dir: Path, adapter_dir: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, adapter_name="a").eval()


def _assert_equal_to_peft(engine: Engine, ref: PeftModel) -> None:
    """Prompt logits of a ragged prefill (index 0: no adapter segment) and 6 greedy tokens against peft's
    model with the adapter, named "a"."""
    assert_prompt_logits_equal_peft(engine, ref, [("a", 23), ("a", 9)], {})
    requests = [RequestIn(i, prompt(50 + i, n), SamplingParams(), 6, ignore_eos=True) for i, n in enumerate([5, 17])]
    tokens = greedy_tokens(engine, requests, 1)
    for r in requests:
        assert tokens[r.id] == peft_greedy(ref, r.input_ids, "a", 6), r.id


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
@pytest.mark.parametrize(
    "stored_dtype, lora",
    [
        (None, dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR)),
        (torch.bfloat16, dict(r=4, lora_alpha=6, target_modules=["k_proj", "up_proj"], use_rslora=True)),
    ],
    ids=["all-linear", "bf16-rslora-parts"],
)
def test_merged_model_equals_peft(llama_dir, tmp_path, monkeypatch, packed, stored_dtype, lora) -> None:
    adapter = make_lora_adapter(llama_dir, tmp_path / "a", 21, stored_dtype=stored_dtype, **lora)
    _assert_equal_to_peft(_merged_engine(llama_dir, adapter, packed, monkeypatch), _peft(llama_dir, adapter))


def test_only_the_targeted_weights_change(llama_dir, tmp_path, monkeypatch) -> None:
    adapter = make_lora_adapter(llama_dir, tmp_path / "a", 5, r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"])
    monkeypatch.setenv("LORAX_PACKED_WEIGHTS", "0")
    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    before = {id(linear): linear.weight.clone() for linear in model.linears()}
    embed = model.embed.clone()
    assert merge_into_base(model, adapter) == 2 * model.config.num_layers
    for name, (linear, part) in model.adaptable_linears().items():
        start = sum(linear.part_sizes[:part])
        rows = slice(start, start + linear.part_sizes[part])
        same = torch.equal(linear.weight[rows], before[id(linear)][rows])
        assert same == (name.rsplit(".", 1)[-1] not in ("v_proj", "down_proj")), name
    assert torch.equal(model.embed, embed)


def test_adapters_it_cannot_merge_exactly_are_refused_unchanged(llama_dir, tmp_path, monkeypatch) -> None:
    adapter = make_lora_adapter(llama_dir, tmp_path / "a", 3, r=4, lora_alpha=8, target_modules=["q_proj"])
    monkeypatch.setenv("LORAX_PACKED_WEIGHTS", "0")
    model = load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32", quantize="bitsandbytes")
    weights = [linear.weight for linear in model.linears()]
    with pytest.raises(AdapterLoadError, match="quantized"):
        merge_into_base(model, adapter)
    assert [linear.weight for linear in model.linears()] == weights
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError):
        merge_into_base(
            load_model(llama_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32"), tmp_path / "empty"
        )
