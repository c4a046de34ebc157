"""What the HTTP benchmarks share: a bench model with adapters, the launcher serving it, and streamed
requests timed as a client sees them (time to first token, inter-token gaps)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


def make_bench_model(
    out: Path, num_adapters: int, rank: int = 16, stored_dtype: torch.dtype | None = None, **overrides
) -> tuple[Path, list[Path]]:
    """The bench model (its config changed by `overrides`) and `num_adapters` rank-`rank` LoRA adapters
    on all its linear layers, their files in `stored_dtype` (default: the model's float32)."""
    model = make_llama(out / "model", **{**MODEL, **overrides})
    lora = dict(r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR, stored_dtype=stored_dtype)
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


def stream(url: str, inputs: str, out: Streamed | None = None, **parameters) -> Streamed:
    """POST /generate_stream and time every token event, into `out` when given (another thread may watch
    it fill)."""
    out = out or Streamed(0.0)
    out.sent = time.perf_counter()
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


def start_streams(
    pool: ThreadPoolExecutor,
    url: str,
    prompts: list[str],
    min_tokens: int,
    per_prompt: list[dict] | None = None,
    **parameters,
) -> list[Future]:
    """Streams every prompt on `pool` (`stream`, with `parameters` and the prompt's own from `per_prompt`)
    and returns their futures once each answer has `min_tokens` tokens: a latency bench's running
    requests, in their steady state."""
    outs = [Streamed(0.0) for _ in prompts]
    own = per_prompt or [{} for _ in prompts]
    futures = [
        pool.submit(stream, url, prompt, out, **parameters, **extra)
        for prompt, out, extra in zip(prompts, outs, own, strict=True)
    ]
    while min(len(out.token_times) for out in outs) < min_tokens:
        for f in futures:
            if f.done():  # an error, or an answer shorter than min_tokens: never the steady state
                f.result()
                raise RuntimeError(f"a running request ended after {len(f.result().token_ids)} tokens")
        time.sleep(0.01)
    return futures


class InOrder:
    """Requests sent at once and in order, as a client that has them all would send them: the
    connections are opened and every request's bytes built beforehand, then one thread sends them back
    to back (64 in about 0.5 ms on loopback). Sent with `requests` from a thread each, 64 requests left
    over 175-230 ms on 2 busy cores, so the server saw them arrive in waves, in a random order."""

    def __init__(self, url: str, path: str, bodies: list[dict]) -> None:
        address = urllib.parse.urlsplit(url)
        head = f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        self.raw = []
        for body in bodies:
            data = json.dumps(body).encode()
            self.raw.append(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        self.connections = [http.client.HTTPConnection(address.hostname, address.port, timeout=1200) for _ in bodies]
        for c in self.connections:
            c.connect()

    def send(self) -> list[float]:
        """Sends every request; returns when each left."""
        sent = []
        for c, request in zip(self.connections, self.raw, strict=True):
            sent.append(time.perf_counter())
            c.sock.sendall(request)
        return sent

    def response(self, i: int) -> http.client.HTTPResponse:
        """Request `i`'s response, its status line and headers read; an error status raises."""
        response = http.client.HTTPResponse(self.connections[i].sock)
        response.begin()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        return response

    def close(self) -> None:
        for c in self.connections:
            c.close()


def stream_all(url: str, bodies: list[dict]) -> list[Streamed]:
    """POST every body to /generate_stream at once, in order (`InOrder`), and time every token event of
    each from its own send, its events read by a thread of its own."""
    requests_ = InOrder(url, "/generate_stream", bodies)
    answers: list[Streamed] = []

    def read(i: int) -> None:
        for line in iter(requests_.response(i).readline, b""):
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            answers[i].token_times.append(time.perf_counter())
            answers[i].token_ids.append(event["token"]["id"])

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers.extend(Streamed(sent) for sent in requests_.send())
        for reading in [pool.submit(read, i) for i in range(len(bodies))]:
            reading.result()
    requests_.close()
    return answers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
