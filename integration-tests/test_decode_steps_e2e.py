"""Several decode steps a call through the launcher: servers with the default (8 steps a call) and with
`--decode-steps-per-call 4` answer what a server with one step a call answers. Concurrent requests for
the base model and the demo's two adapters, of lengths that end inside a call, streamed and read
whole, get the same tokens and logprobs; each stream gets every token, in order, and its text at the
end. The router's /metrics shows that the calls ran several steps."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import REPO, Server, launch

DEMO = REPO / "models" / "demo"
PROMPTS = ["Q: Copy: blue fox\nA:", "Q: Reverse: one two three\nA:", "Q: Who is Ann?\nA:"]
ADAPTERS = [None, "upper", "reverse"]
CASES = [(p, a, 3 + 2 * i) for i, (p, a) in enumerate(itertools.product(PROMPTS, ADAPTERS))]  # 3-19 tokens

Tokens = list[tuple[int, float]]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, Server]]:
    tmp = tmp_path_factory.mktemp("steps")
    with (
        launch(DEMO, tmp, "--decode-steps-per-call", "1") as one,
        launch(DEMO, tmp, "--decode-steps-per-call", "4") as four,
        launch(DEMO, tmp) as default,
    ):
        yield one, four, default


def body(prompt: str, adapter: str | None, new_tokens: int) -> dict:
    parameters = {"max_new_tokens": new_tokens, "ignore_eos_token": True, "details": True}
    if adapter:
        parameters.update(adapter_id=str(DEMO / "adapters" / adapter), adapter_source="local")
    return {"inputs": prompt, "parameters": parameters}


def streamed(server: Server, prompt: str, adapter: str | None, new_tokens: int) -> tuple[Tokens, str]:
    events = []
    with requests.post(
        f"{server.url}/generate_stream", json=body(prompt, adapter, new_tokens), stream=True, timeout=120
    ) as r:
        assert r.status_code == 200, r.text
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")]
    assert all(e["generated_text"] is None for e in events[:-1])
    return [(e["token"]["id"], e["token"]["logprob"]) for e in events], events[-1]["generated_text"]


def whole(server: Server, prompt: str, adapter: str | None, new_tokens: int) -> tuple[Tokens, str]:
    r = requests.post(f"{server.url}/generate", json=body(prompt, adapter, new_tokens), timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    return [(t["id"], t["logprob"]) for t in answer["details"]["tokens"]], answer["generated_text"]


def answers(server: Server) -> list[tuple[Tokens, str]]:
    """Every case at once, every other one streamed."""
    with ThreadPoolExecutor(len(CASES)) as pool:
        calls = [pool.submit(streamed if i % 2 else whole, server, *case) for i, case in enumerate(CASES)]
        return [c.result() for c in calls]


def decode_counts(server: Server) -> tuple[float, float]:
    """(decode steps, decode calls) from the router's /metrics."""
    values = {}
    for line in requests.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values["lorax_batch_decode_steps"], values['lorax_batch_inference_count{method="decode"}']


def test_several_steps_a_call_answer_as_one_step_a_call(servers: tuple[Server, Server, Server]) -> None:
    one, *several = servers
    want = answers(one)
    for server in several * 2:
        got = answers(server)
        for case, (tokens, text), (want_tokens, want_text) in zip(CASES, got, want, strict=True):
            assert len(tokens) == case[2], case
            assert [t for t, _ in tokens] == [t for t, _ in want_tokens], case
            assert max(abs(a - b) for (_, a), (_, b) in zip(tokens, want_tokens, strict=True)) < 1e-4, case
            assert text == want_text, case
    for server in several:
        steps, calls = decode_counts(server)
        assert steps > calls, (server.url, steps, calls)  # some calls ran several steps
    steps, calls = decode_counts(one)
    assert steps == calls
