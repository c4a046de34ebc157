"""`--quantize eetq` through the real launcher: concurrent greedy requests, with and without a LoRA adapter
in the same batches, return exactly the tokens transformers (and peft) generate on the independently
fake-quantized checkpoint; a method that is not supported yet stops the launcher with a message."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import BIN, greedy_ids, launch
from families import FAMILIES, LORA_KWARGS, build_family
from peft import PeftModel
from quantized import reference_checkpoint
from ragged_runs import run_reference
from tiny_models import make_lora_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model

PROMPTS = ["The quick brown fox", "LoRA", "Paged attention stores keys and values.", "def add(a, b):"]
NEW_TOKENS = 8


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_quantized_base_with_an_adapter_over_http(family: str, tmp_path: Path) -> None:
    _, model_name, _, targets = FAMILIES[family]
    model_dir, _ = build_family(family, tmp_path / "base")
    adapter = make_lora_adapter(model_dir, tmp_path / "lora", 1, r=8, lora_alpha=16, target_modules=targets[0],
                                **LORA_KWARGS.get(model_name, {}))  # fmt: skip
    ours = load_model(model_dir, TorchAttention(4), torch.device("cpu"), "float32", quantize="eetq")
    ref_dir = reference_checkpoint(model_dir, ours, tmp_path / "reference")
    del ours
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(reference, adapter)
    requests_ = [(p, i % 2 == 1) for i, p in enumerate(PROMPTS)]  # every other request uses the adapter
    want = [
        run_reference(with_adapter.eval() if use else base, torch.tensor(tok(p).input_ids), NEW_TOKENS)[2]
        for p, use in requests_
    ]
    lora = {"adapter_id": str(adapter), "adapter_source": "local"}
    with launch(model_dir, tmp_path, "--quantize", "eetq") as server, ThreadPoolExecutor(len(requests_)) as pool:
        got = list(pool.map(lambda r: greedy_ids(server, r[0], NEW_TOKENS, **(lora if r[1] else {})), requests_))
    assert got == want


def test_a_method_not_supported_yet_stops_the_launcher(llama_dir: Path) -> None:
    run = subprocess.run(
        [str(BIN / "lorax-launcher"), "--model-id", str(llama_dir), "--quantize", "gptq"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "--quantize gptq is not supported yet (supported: eetq)" in run.stdout + run.stderr
