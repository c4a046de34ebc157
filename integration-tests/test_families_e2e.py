"""Every natively supported family served over HTTP by the real launcher: concurrent ragged greedy
requests return exactly the tokens transformers generates for each prompt alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import greedy_ids, launch
from families import FAMILIES, build_family
from ragged_runs import run_reference
from transformers import AutoModelForCausalLM, AutoTokenizer

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
