"""`--speculative-tokens` through the launcher over HTTP: the demo model and its adapters answer
exactly as without speculation (ids, logprobs, text), in concurrent mixed-adapter requests, while
tokens arrive several per step (`skipped`), counted in `details.skipped_tokens`, /metrics and /info."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import REPO, Server, launch

sys.path.insert(0, str(REPO / "scripts"))
from demo_data import copy_example  # noqa: E402
from train_demo_adapters import held_out_passages  # noqa: E402

DEMO = REPO / "models" / "demo"
ADAPTERS = [None, "answer-format", "upper", "reverse"]
FLAGS = ("--max-input-length", "200", "--max-total-tokens", "260", "--max-batch-prefill-tokens", "1024")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("spec")
    with launch(DEMO, tmp, *FLAGS) as plain, launch(DEMO, tmp, *FLAGS, "--speculative-tokens", "4") as fast:
        yield plain, fast


def prompts() -> list[str]:
    """Few-shot Copy: prompts: the demo model continues them by repeating their pattern."""
    rng = random.Random(3)
    out = []
    for _ in range(8):
        shots = [copy_example(rng) for _ in range(5)]
        out.append("".join(f"Q: {q}\nA: {a}\n" for q, a in shots) + f"Q: {shots[1][0]}\nA:")
    return out


def generate(server: Server, i: int, prompt: str, **extra: object) -> dict:
    parameters = {"max_new_tokens": 40, "details": True, "decoder_input_details": False, **extra}
    if ADAPTERS[i % 4] is not None:
        parameters |= {"adapter_id": str(DEMO / "adapters" / ADAPTERS[i % 4]), "adapter_source": "local"}
    r = requests.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120)
    assert r.status_code == 200, r.text
    return {**r.json(), "x-skipped-tokens": int(r.headers["x-skipped-tokens"])}


def concurrently(server: Server, **extra: object) -> list[dict]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda ip: generate(server, *ip, **extra), enumerate(prompts())))


@pytest.mark.parametrize(
    "extra",
    [{"ignore_eos_token": True}, {"do_sample": True, "temperature": 0.5, "seed": 11, "ignore_eos_token": True}, {}],
    ids=["greedy", "seeded", "to-eos"],
)
def test_same_answers_fewer_steps(servers: tuple[Server, Server], extra: dict) -> None:
    plain, fast = servers
    want, got = concurrently(plain, **extra), concurrently(fast, **extra)
    for a, b in zip(want, got, strict=True):
        assert b["generated_text"] == a["generated_text"]
        ta, tb = a["details"]["tokens"], b["details"]["tokens"]
        assert [t["id"] for t in tb] == [t["id"] for t in ta]
        assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(ta, tb, strict=True)) < 1e-4
        assert not any(t["skipped"] for t in ta) and a["details"]["skipped_tokens"] == 0
        assert b["details"]["skipped_tokens"] == sum(t["skipped"] for t in tb) == b["x-skipped-tokens"]
        assert not tb[0]["skipped"]  # the first token comes from prefill
    if "seed" not in extra:  # the demo model copies what it is shown: drafts are kept
        assert sum(b["details"]["skipped_tokens"] for b in got) > 0


def test_quoted_passages_arrive_mostly_skipped(servers: tuple[Server, Server]) -> None:
    """The demo `quote` adapter copies whole passages from its prompt: the same answers, with most of
    their tokens drafted by prompt lookup and kept (several per step), concurrent requests included."""
    plain, fast = servers
    quote = {"adapter_id": str(DEMO / "adapters" / "quote"), "adapter_source": "local", "max_new_tokens": 48}

    def ask(server: Server, passage: str) -> dict:
        body = {"inputs": f"Q: Quote: {passage}\nA:", "parameters": {"details": True, **quote}}
        r = requests.post(f"{server.url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    passages = held_out_passages()[:6]
    with ThreadPoolExecutor(6) as pool:
        want, got = list(pool.map(lambda p: ask(plain, p), passages)), list(pool.map(lambda p: ask(fast, p), passages))
    for a, b in zip(want, got, strict=True):
        assert [t["id"] for t in b["details"]["tokens"]] == [t["id"] for t in a["details"]["tokens"]]
        assert b["generated_text"] == a["generated_text"]
    copied = sum(a["generated_text"] == " " + p for a, p in zip(want, passages, strict=True))
    assert copied >= 4  # the adapter's held-out accuracy is 88%
    tokens = sum(b["details"]["generated_tokens"] for b in got)
    assert sum(b["details"]["skipped_tokens"] for b in got) >= tokens // 2


def test_stream_marks_skipped_tokens(servers: tuple[Server, Server]) -> None:
    _, fast = servers
    prompt = prompts()[0]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 40, "ignore_eos_token": True}}
    with requests.post(f"{fast.url}/generate_stream", json=body, stream=True, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
    tokens = [e["token"] for e in events]
    whole = generate(fast, 0, prompt, ignore_eos_token=True)["details"]["tokens"]
    assert [t["id"] for t in tokens] == [t["id"] for t in whole]
    assert [t["skipped"] for t in tokens] == [t["skipped"] for t in whole]
    assert any(t["skipped"] for t in tokens)


def test_medusa_default_adapter(servers: tuple[Server, Server], tmp_path_factory: pytest.TempPathFactory) -> None:
    """The demo Medusa heads as the default adapter (no --speculative-tokens): requests that name no
    adapter, and those on a LoRA without heads, draft with them and answer as the plain server does."""
    plain, _ = servers
    medusa = ("--adapter-id", str(DEMO / "adapters" / "medusa"), "--adapter-source", "local")
    skipped = [0, 0]  # without an adapter of their own, on a LoRA
    with launch(DEMO, tmp_path_factory.mktemp("medusa"), *FLAGS, *medusa) as server:
        for i, prompt in enumerate(prompts()[:6]):
            adapter = 0 if i < 4 else i - 3  # then answer-format and upper: LoRAs the default's heads draft for
            want = generate(plain, adapter, prompt, ignore_eos_token=True)
            got = generate(server, adapter, prompt, ignore_eos_token=True)
            assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in want["details"]["tokens"]]
            assert got["generated_text"] == want["generated_text"]
            skipped[bool(adapter)] += got["details"]["skipped_tokens"]
    assert all(skipped)  # the LoRA requests drafted with the default's heads too


def test_info_and_metrics(servers: tuple[Server, Server]) -> None:
    plain, fast = servers
    assert requests.get(f"{plain.url}/info", timeout=10).json()["speculate"] == 0
    assert requests.get(f"{fast.url}/info", timeout=10).json()["speculate"] == 4
    metrics = requests.get(f"{fast.url}/metrics", timeout=10).text
    sums = [line for line in metrics.splitlines() if line.startswith("lorax_request_skipped_tokens_sum")]
    assert sums and float(sums[0].split()[-1]) > 0
