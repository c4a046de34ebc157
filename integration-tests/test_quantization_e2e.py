"""Quantized bases through the real launcher. Concurrent greedy requests, a mixed batch of the base and
three adapters (fp32, fp16 and bf16 files), return exactly the tokens transformers and peft generate on
the dequantized reference, on a GPTQ checkpoint and with `--quantize bitsandbytes-nf4`; `/info` reports
the method; an adapter whose shapes do not fit the base gets a 422 and harms nothing. Checkpoints that
do not fit the method stop the launcher with a message."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from conftest import BIN, greedy_ids, launch
from families import FAMILIES, LORA_KWARGS, build_family
from peft import PeftModel
from quant_packers import gptq_checkpoint
from quantized import dequantized_checkpoint
from ragged_runs import run_reference
from safetensors.torch import load_file, save_file
from tiny_models import make_llama, make_lora_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model

PROMPTS = ["The quick brown fox", "LoRA", "Paged attention stores keys and values.", "def add(a, b):"]
NEW_TOKENS = 8


def _adapters(model_dir: Path, tmp: Path) -> list[Path]:
    _, model_name, _, targets = FAMILIES["llama"]
    made = []
    for i, (dtype, r, t) in enumerate([(torch.float32, 8, targets[0]), (torch.float16, 16, targets[1]),
                                       (torch.bfloat16, 8, targets[0] + targets[1])]):  # fmt: skip
        path = make_lora_adapter(model_dir, tmp / f"lora{i}", i, r=r, lora_alpha=16, target_modules=t,
                                 **LORA_KWARGS.get(model_name, {}))  # fmt: skip
        file = path / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(file)).items()}, str(file))
        made.append(path)
    return made


@pytest.mark.parametrize("method", ["gptq", "bitsandbytes-nf4"])
def test_quantized_base_with_three_adapters_over_http(method: str, tmp_path: Path) -> None:
    model_dir, _ = build_family("llama", tmp_path / "base")
    adapters = _adapters(model_dir, tmp_path)
    if method == "gptq":
        served, ref_dir = gptq_checkpoint(model_dir, tmp_path)
    else:
        served = model_dir
        ours = load_model(model_dir, TorchAttention(4), torch.device("cpu"), "float32", quantize=method)
        ref_dir = dequantized_checkpoint(model_dir, ours, tmp_path / "reference")
        del ours
    tok = AutoTokenizer.from_pretrained(model_dir)
    want = []
    for i, prompt in enumerate(PROMPTS):  # request i uses no adapter (i = 0) or adapter i
        ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
        if i:
            ref = PeftModel.from_pretrained(ref, adapters[i - 1]).eval()
        want.append(run_reference(ref, torch.tensor(tok(prompt).input_ids), NEW_TOKENS)[2])
    lora = [{}] + [{"adapter_id": str(a), "adapter_source": "local"} for a in adapters]
    wide = make_lora_adapter(make_llama(tmp_path / "wide_base", hidden_size=96, intermediate_size=160),
                             tmp_path / "wide", 0, r=4, target_modules=["q_proj"])  # fmt: skip
    with launch(served, tmp_path, "--quantize", method) as server, ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda i: greedy_ids(server, PROMPTS[i], NEW_TOKENS, **lora[i]), range(len(PROMPTS))))
        info = requests.get(f"{server.url}/info", timeout=10).json()
        misfit = requests.post(f"{server.url}/generate", timeout=60, json={"inputs": PROMPTS[0], "parameters": {
            "adapter_id": str(wide), "adapter_source": "local", "max_new_tokens": 2}})  # fmt: skip
        assert greedy_ids(server, PROMPTS[1], NEW_TOKENS, **lora[1]) == want[1]  # unharmed
    assert got == want
    assert info["quantize"] == method
    assert misfit.status_code == 422 and "shape mismatch" in misfit.json()["error"]


def _refused(model_dir: Path, *extra: str) -> str:
    run = subprocess.run(
        [str(BIN / "lorax-launcher"), "--model-id", str(model_dir), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    return run.stdout + run.stderr


def test_checkpoints_that_do_not_fit_the_method_stop_the_launcher(llama_dir: Path, tmp_path: Path) -> None:
    out = _refused(llama_dir, "--quantize", "gptq")
    assert "tensor 'model.layers.0.self_attn.q_proj.qweight' is missing" in out
    assert "expects a checkpoint quantized with GPTQ" in out
    assert "exl2 needs ExLlamaV2's CUDA kernels" in _refused(llama_dir, "--quantize", "exl2")
    gptq_dir, _ = gptq_checkpoint(llama_dir, tmp_path)
    assert "--quantize awq contradicts the checkpoint" in _refused(gptq_dir, "--quantize", "awq")
