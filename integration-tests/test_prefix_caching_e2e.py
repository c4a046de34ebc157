"""`--prefix-caching` through the launcher: concurrent requests for the base model and two adapters,
sharing a long instruction prefix, answer exactly what the same requests answer when their prompts are
computed in full (a request asking for its prompt's logprobs never reuses cached blocks)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import REPO, Server, launch

DEMO = REPO / "models" / "demo"
PREFIX = (
    "Q: You are a careful assistant. Answer every question with one short phrase, and never repeat "
    "the question. Read it twice before you answer. "
)
QUESTIONS = ["Uppercase: green moon river", "Reverse: one two three", "Who is Ann?", "Uppercase: red fox"]
ADAPTERS = [None, "upper", "reverse"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    limits = ["--max-input-length", "96", "--max-total-tokens", "128", "--max-batch-prefill-tokens", "400"]
    with launch(DEMO, tmp_path_factory.mktemp("prefix"), "--prefix-caching", *limits) as s:
        yield s


def generate(server: Server, question: str, adapter: str | None, full_prompt: bool) -> list[tuple[int, float]]:
    parameters = {"max_new_tokens": 12, "details": True, "decoder_input_details": full_prompt}
    if adapter:
        parameters.update(adapter_id=str(DEMO / "adapters" / adapter), adapter_source="local")
    body = {"inputs": f"{PREFIX}{question}\nA:", "parameters": parameters}
    r = requests.post(f"{server.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [(t["id"], t["logprob"]) for t in r.json()["details"]["tokens"]]


def test_cached_prefixes_answer_as_computed_ones(server: Server) -> None:
    cases = [(q, a) for q in QUESTIONS for a in ADAPTERS]
    want = {case: generate(server, *case, full_prompt=True) for case in cases}
    for _ in range(2):  # the second round finds every prefix cached, also across batches
        with ThreadPoolExecutor(len(cases)) as pool:
            got = dict(zip(cases, pool.map(lambda c: generate(server, *c, full_prompt=False), cases), strict=True))
        for case in cases:
            assert [t for t, _ in got[case]] == [t for t, _ in want[case]], case
            assert max(abs(a - b) for (_, a), (_, b) in zip(got[case], want[case], strict=True)) < 1e-4, case
