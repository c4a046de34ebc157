"""Prefix caching and chunked prefill through the launcher, together: a server with `--prefix-caching`
and `--chunked-prefill` and a prefill budget smaller than the prompts. Concurrent requests for the base
model and two adapters, sharing a long instruction prefix, answer exactly what the same requests answer
when their prompts are computed in full (a request asking for its prompt's logprobs never reuses cached
blocks), and a long prompt's greedy answer equals transformers' for the same prompt tokens while other
requests stream."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from conftest import REPO, Server, launch

DEMO = REPO / "models" / "demo"
PREFIX = (
    "Q: You are a careful assistant. Answer every question with one short phrase, and never repeat "
    "the question. Read it twice before you answer. "
)
QUESTIONS = ["Uppercase: green moon river", "Reverse: one two three", "Who is Ann?", "Uppercase: red fox"]
ADAPTERS = [None, "upper", "reverse"]
BUDGET = 32  # prompt tokens a step computes; the prompts here have about 75


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    limits = ["--max-input-length", "96", "--max-total-tokens", "128", "--max-batch-prefill-tokens", str(BUDGET)]
    flags = ["--prefix-caching", "--chunked-prefill", *limits]
    with launch(DEMO, tmp_path_factory.mktemp("prefill"), *flags) as s:
        yield s


def generate(server: Server, question: str, adapter: str | None, full_prompt: bool) -> dict:
    parameters = {"max_new_tokens": 12, "details": True, "decoder_input_details": full_prompt}
    if adapter:
        parameters.update(adapter_id=str(DEMO / "adapters" / adapter), adapter_source="local")
    body = {"inputs": f"{PREFIX}{question}\nA:", "parameters": parameters}
    r = requests.post(f"{server.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["details"]


def tokens(details: dict) -> list[tuple[int, float]]:
    return [(t["id"], t["logprob"]) for t in details["tokens"]]


def test_cached_prefixes_answer_as_computed_ones(server: Server) -> None:
    cases = [(q, a) for q in QUESTIONS for a in ADAPTERS]
    want = {case: tokens(generate(server, *case, full_prompt=True)) for case in cases}
    for _ in range(2):  # the second round finds every prefix cached, also across batches
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = pool.map(lambda c: tokens(generate(server, *c, full_prompt=False)), cases)
            got = dict(zip(cases, answers, strict=True))
        for case in cases:
            assert [t for t, _ in got[case]] == [t for t, _ in want[case]], case
            assert max(abs(a - b) for (_, a), (_, b) in zip(got[case], want[case], strict=True)) < 1e-4, case


def test_a_chunked_prompt_equals_transformers_while_others_stream(server: Server) -> None:
    from transformers import AutoModelForCausalLM

    def stream_short() -> int:
        body = {"inputs": "Q: Who is Ann?\nA:", "parameters": {"max_new_tokens": 24, "ignore_eos_token": True}}
        with requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=120) as r:
            return sum(1 for line in r.iter_lines() if line.startswith(b"data:"))

    with ThreadPoolExecutor(2) as pool:
        short = pool.submit(stream_short)
        details = generate(server, "Tell me about Cy and Bob.", None, full_prompt=True)
        assert short.result() == 24
    ids = [t["id"] for t in details["prefill"]]
    assert len(ids) > 2 * BUDGET  # three chunks at least
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=len(details["tokens"]), do_sample=False)
    assert [t["id"] for t in details["tokens"]] == out[0, len(ids) :].tolist()
