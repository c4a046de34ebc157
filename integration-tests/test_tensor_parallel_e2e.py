"""`--num-shard 2` through the real launcher over HTTP: every family configuration answers concurrent
greedy requests with the tokens of one shard (logprobs within 1e-4), mixed-adapter batches included;
a rank killed mid-stream ends the stream with an error event within 5 s and the launcher stops,
leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from conftest import BIN, free_port
from conftest import launch as launch_server
from families import FAMILIES, LORA_KWARGS, build_family
from test_expert_lora import ADAPTERS as EXPERT_ADAPTERS
from test_expert_lora import write_adapter
from tiny_models import make_lora_adapter
from tp_ranks import engine_tokens
from transformers import AutoTokenizer

PROMPTS = ["The quick brown fox", "LoRA", "Paged attention stores keys and values in fixed-size blocks."]
NEW_TOKENS = 8
# Families whose mixed-adapter batches are checked (Mixtral's adapters adapt its experts).
ADAPTER_FAMILIES = ["gemma2", "gpt2", "llama", "mistral", "mixtral", "phi3", "qwen2"]


def _adapters(name: str, model_dir: Path, tmp: Path) -> list[str]:
    if name not in ADAPTER_FAMILIES:
        return []
    if name == "mixtral":
        return [str(write_adapter(tmp / f"experts{i}", i, *spec)) for i, spec in enumerate(EXPERT_ADAPTERS.values())]
    _, model_cls, _, targets = FAMILIES[name]
    kwargs = LORA_KWARGS.get(model_cls, {})
    return [
        str(make_lora_adapter(model_dir, tmp / f"lora{i}", i, r=4 * (i + 1), lora_alpha=8, target_modules=t, **kwargs))
        for i, t in enumerate(targets)
    ]


def _generate(url: str, prompt: str, adapter: str | None) -> list[tuple[int, float]]:
    parameters = {"max_new_tokens": NEW_TOKENS, "ignore_eos_token": True, "details": True}
    if adapter is not None:
        parameters.update(adapter_id=adapter, adapter_source="local")
    r = requests.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=300)
    assert r.status_code == 200, r.text
    return [(t["id"], t["logprob"]) for t in r.json()["details"]["tokens"]]


@pytest.mark.parametrize("name", [*sorted(FAMILIES), "qwen_v1"])
def test_two_shards_over_http_answer_like_one(name: str, tmp_path: Path) -> None:
    model_dir, _ = build_family(name, tmp_path / name)
    adapters = _adapters(name, model_dir, tmp_path)
    cases = [(p, None) for p in PROMPTS] + [(p, a) for a in adapters for p in PROMPTS[:2]]
    tok = AutoTokenizer.from_pretrained(model_dir)
    index = {a: i for i, a in enumerate(adapters, start=1)}
    want = engine_tokens(model_dir, adapters, [(tok(p).input_ids, index.get(a, 0), NEW_TOKENS) for p, a in cases])
    with launch_server(model_dir, tmp_path, "--num-shard", "2") as server, ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda case: _generate(server.url, *case), cases))
        assert "All 2 shard(s) are ready" in server.log()
    for case, ours, reference in zip(cases, got, want, strict=True):
        assert [t for t, _ in ours] == [t for t, _ in reference], case
        assert max(abs(a - b) for (_, a), (_, b) in zip(ours, reference, strict=True)) < 1e-4, case


def _rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        try:
            if "serve" in child.cmdline() and child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no shard process with RANK={rank}")


def test_a_rank_killed_mid_stream_errors_the_stream_and_stops_everything(llama_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "launcher.log"
    args = [str(BIN / "lorax-launcher"), "--model-id", str(llama_dir), "--port", str(port), "--hostname", "127.0.0.1",
            "--shard-uds-path", str(tmp_path / "shard"), "--num-shard", "2", "--kv-cache-blocks", "256",
            "--max-input-length", "64", "--max-total-tokens", "1024", "--max-batch-prefill-tokens", "512"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while not _healthy(url):
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.time() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.25)
        launcher = psutil.Process(proc.pid)
        children = launcher.children(recursive=True)
        victim = _rank_process(launcher, 1)
        body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 900, "ignore_eos_token": True}}
        events: list[tuple[float, dict]] = []
        first_token = threading.Event()

        def stream() -> None:
            with requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith(b"data:"):
                        events.append((time.monotonic(), json.loads(line[5:])))
                        first_token.set()
            first_token.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_token.wait(60)
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        reader.join(60)
        errors = [(t, e) for t, e in events if "error" in e]
        assert errors, f"the stream ended without an error event: {events[-1:]}"
        assert errors[0][0] - killed_at < 5.0, errors[0]
        assert not any(e.get("details") for _, e in events), "the stream must not finish normally"
        assert proc.wait(timeout=60) != 0  # the launcher stops everything and says it failed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes left behind: {[c.pid for c in alive]}"


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False
