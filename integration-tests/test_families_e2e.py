"""Every natively supported family served over HTTP by the real launcher: concurrent ragged greedy
requests return exactly the tokens transformers generates for each prompt alone; quantized with
`--quantize bitsandbytes-nf4` and from a GPTQ checkpoint, the tokens transformers generates with the
dequantized weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import greedy_ids, launch
from families import FAMILIES, build_family
from quant_packers import gptq_checkpoint
from quantized import dequantized_checkpoint
from ragged_runs import run_reference
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model

PROMPTS = [
    "The quick brown fox",
    "LoRA",
    "Paged attention stores keys and values in fixed-size blocks.",
    "def add(a, b):",
]
NEW_TOKENS = 8


def _reference(model_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [run_reference(model, torch.tensor(tok(p).input_ids), NEW_TOKENS)[2] for p in PROMPTS]


@pytest.mark.parametrize("name", [*sorted(FAMILIES), "qwen_v1"])
def test_greedy_tokens_over_http_equal_transformers(name: str, tmp_path: Path) -> None:
    model_dir, reference_dir = build_family(name, tmp_path / name)
    want = _reference(reference_dir)
    with launch(model_dir, tmp_path) as server, ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda prompt: greedy_ids(server, prompt, NEW_TOKENS), PROMPTS))
    assert got == want


# One variant of each architecture.
ARCHITECTURES = ["bloom", "cohere", "dbrx", "gemma", "gemma2", "gpt2", "llama", "mistral", "mixtral", "phi", "phi3",
                 "qwen2", "qwen_v1"]  # fmt: skip


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("method", ["bitsandbytes-nf4", "gptq"])
def test_quantized_families_over_http_equal_transformers_on_the_dequantized_weights(
    name: str, method: str, tmp_path: Path
) -> None:
    # Qwen v1 is served from its own checkpoint and checked against the Qwen2 one it renames: both
    # formats quantize each output row on its own, so the fused c_attn quantizes as q, k and v do.
    model_dir, renamed = build_family(name, tmp_path / name)
    if method == "gptq":  # a GPTQ checkpoint written by the tests' packer (4-bit, group 32, act-order)
        served, reference_dir = gptq_checkpoint(model_dir, tmp_path / "served")
        if renamed != model_dir:
            _, reference_dir = gptq_checkpoint(renamed, tmp_path / "renamed")
    else:
        served = model_dir
        ours = load_model(renamed, TorchAttention(4), torch.device("cpu"), "float32", quantize=method)
        reference_dir = dequantized_checkpoint(renamed, ours, tmp_path / "reference")
        del ours
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    want = [run_reference(model, torch.tensor(tok(p).input_ids), NEW_TOKENS)[2] for p in PROMPTS]
    with launch(served, tmp_path, "--quantize", method) as server, ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda prompt: greedy_ids(server, prompt, NEW_TOKENS), PROMPTS))
    assert got == want
