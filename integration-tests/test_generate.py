"""End to end over HTTP: greedy tokens equal transformers, streaming, concurrency, the real clients."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The quick brown fox",
    "Paged attention",
    "1 + 1 =",
    "Zürich and 東京",
    "def add(a, b):",
    "LoRA adapters add",
    "x",
    "The lazy dog jumps over the quick brown fox and then",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def reference(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def greedy(prompt: str, n: int = NEW_TOKENS) -> list[int]:
        ids = torch.tensor([tok(prompt).input_ids])
        out = []
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        return out

    return tok, greedy


def generate(server, prompt: str, **params) -> dict:
    params = {"max_new_tokens": NEW_TOKENS, "ignore_eos_token": True, **params}
    r = requests.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": params}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_greedy_equals_transformers(server, reference) -> None:
    tok, greedy = reference
    for prompt in PROMPTS[:4]:
        body = generate(server, prompt, details=True)
        ids = [t["id"] for t in body["details"]["tokens"]]
        assert ids == greedy(prompt), prompt
        assert body["generated_text"] == tok.decode(ids, skip_special_tokens=True)
        details = body["details"]
        assert details["generated_tokens"] == NEW_TOKENS and details["finish_reason"] == "length"
        assert details["prompt_tokens"] == len(tok(prompt).input_ids)


def test_generate_stream_equals_transformers(server, reference) -> None:
    tok, greedy = reference
    prompt = PROMPTS[4]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "ignore_eos_token": True}}
    events = []
    with requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
    ids = [e["token"]["id"] for e in events]
    assert ids == greedy(prompt)
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == tok.decode(ids, skip_special_tokens=True)
    assert events[-1]["details"]["finish_reason"] == "length"


def test_concurrent_ragged_requests_each_equal_their_solo_result(server) -> None:
    cases = [(PROMPTS[i % len(PROMPTS)], 4 + (i * 5) % 20) for i in range(16)]
    solo = {c: generate(server, c[0], max_new_tokens=c[1])["generated_text"] for c in set(cases)}
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda c: generate(server, c[0], max_new_tokens=c[1])["generated_text"], cases))
    assert texts == [solo[c] for c in cases]


def test_compat_route_returns_a_list_or_a_stream(server) -> None:
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 3}}
    r = requests.post(f"{server.url}/", json=body, timeout=60)
    assert r.status_code == 200 and isinstance(r.json(), list) and "generated_text" in r.json()[0]
    with requests.post(f"{server.url}/", json={**body, "stream": True}, stream=True, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert sum(1 for line in r.iter_lines() if line.startswith(b"data:")) == 3


def test_lorax_client(server, reference) -> None:
    from lorax import AsyncClient, Client

    _, greedy = reference
    client = Client(server.url)
    resp = client.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos_token=True, details=True)
    assert [t.id for t in resp.details.tokens] == greedy(PROMPTS[1])
    streamed = [
        r.token.id for r in client.generate_stream(PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    ]
    assert streamed == greedy(PROMPTS[1])

    async def run_async() -> str:
        return (
            await AsyncClient(server.url).generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
        ).generated_text

    assert asyncio.run(run_async()) == resp.generated_text


def test_text_generation_client(server) -> None:
    from text_generation import Client

    client = Client(server.url)
    resp = client.generate(PROMPTS[2], max_new_tokens=5, decoder_input_details=True)
    assert resp.details.generated_tokens <= 5 and resp.details.finish_reason in ("length", "eos_token")
    assert [t.id for t in resp.details.prefill][1:] == client_ids(server, PROMPTS[2])[1:]
    tokens = [r.token.id for r in client.generate_stream(PROMPTS[2], max_new_tokens=5)]
    assert tokens == [t.id for t in resp.details.tokens]


def client_ids(server, text: str) -> list[int]:
    r = requests.post(f"{server.url}/tokenize", json={"inputs": text}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    return [t["id"] for t in body] if isinstance(body, list) else body["ids"]


def test_info_health_metrics_tokenize(server) -> None:
    info = requests.get(f"{server.url}/info", timeout=10).json()
    assert info["max_input_length"] == 64 and info["max_total_tokens"] == 128
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert "lorax_request_count" in metrics or "request" in metrics
    r = requests.post(f"{server.url}/tokenize", json={"inputs": "hello world"}, timeout=10)
    assert r.status_code == 200
