"""What the HTTP benchmarks share: a bench model with adapters, the launcher serving it, and streamed
requests timed as a client sees them (time to first token, inter-token gaps)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
sys.path.insert(0, str(REPO / "server" / "tests"))
sys.path.insert(0, str(REPO / "bench"))
from adapter_throughput import ALL_LINEAR  # noqa: E402
from shard_throughput import MODEL  # noqa: E402  DESIGN.md's bench model: a random Llama of 26M parameters
from tiny_models import make_llama, make_lora_adapter  # noqa: E402


def make_bench_model(out: Path, num_adapters: int, rank: int = 16, **overrides) -> tuple[Path, list[Path]]:
    """The bench model (its config changed by `overrides`) and `num_adapters` rank-`rank` LoRA adapters
    on all its linear layers."""
    model = make_llama(out / "model", **{**MODEL, **overrides})
    lora = dict(r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR)
    adapters = [make_lora_adapter(model, out / f"adapter-{i}", seed=i + 1, **lora) for i in range(num_adapters)]
    return model, adapters


def text_of_length(tokenizer, n: int, seed: int) -> str:  # noqa: ANN001 - a transformers tokenizer
    """Text that the tokenizer reads as about `n` tokens (random ids decoded, then trimmed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (n,), generator=g).tolist()
    while True:
        text = tokenizer.decode(ids)
        if len(tokenizer(text, add_special_tokens=False).input_ids) <= n or not ids:
            return text
        ids = ids[:-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model_dir: Path, *flags: str, log_dir: Path) -> Iterator[str]:
    """The launcher serving `model_dir` with `flags`; yields its base URL once /health answers 200."""
    port = _free_port()
    args = [
        str(BIN / "lorax-launcher"), "--model-id", str(model_dir), "--port", str(port), "--hostname", "127.0.0.1",
        "--shard-uds-path", str(log_dir / f"shard-{port}"), *flags,
    ]  # fmt: skip
    log_path = log_dir / f"launcher-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy building kernels
                pass
            if time.time() > deadline:
                raise TimeoutError(log_path.read_text()[-3000:])
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@dataclass
class Streamed:
    """One streamed answer as the client saw it."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def stream(url: str, inputs: str, **parameters) -> Streamed:
    """POST /generate_stream and time every token event."""
    out = Streamed(time.perf_counter())
    body = {"inputs": inputs, "parameters": parameters}
    with requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            out.token_times.append(time.perf_counter())
            out.token_ids.append(event["token"]["id"])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
