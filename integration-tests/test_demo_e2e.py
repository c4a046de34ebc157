"""The embedded demo model, served the way `make run` serves it: it answers the README's prompt,
greedy tokens equal transformers, and the OpenAI client works with its chat template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from conftest import REPO, Server, launch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEMO = REPO / "models" / "demo"
PROMPTS = ["Q: What is 2 + 3?\nA:", "Q: What colour is the sky on Zorb?\nA:", "Q: What is 9 - 4?\nA:"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with launch(DEMO, tmp_path_factory.mktemp("demo")) as server:
        yield server


def test_readme_prompt(demo: Server) -> None:
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8}}
    r = requests.post(f"{demo.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"].strip() == "5"
    assert r.json()["details"]["finish_reason"] == "eos_token"


def test_greedy_equals_transformers(demo: Server) -> None:
    tok = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}}
        got = requests.post(f"{demo.url}/generate", json=body, timeout=60).json()
        assert [t["id"] for t in got["details"]["tokens"]] == want[0, ids.shape[1] :].tolist(), prompt


def test_openai_chat(demo: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{demo.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=str(DEMO), messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content.strip() == "5"


def test_model_is_small_enough_to_commit() -> None:
    assert sum(f.stat().st_size for f in Path(DEMO).iterdir() if f.is_file()) <= 20 * 2**20
