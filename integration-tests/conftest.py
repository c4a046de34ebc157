"""Start the real `lorax-launcher` (which starts `lorax-server` shards and `lorax-router`) on models the
tests build, and talk to it over HTTP like a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "server" / "tests"))

from tiny_models import make_llama  # noqa: E402


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launch(
    model_dir: Path, tmp: Path, *extra: str, timeout: float = 240, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Run the launcher until the router answers /health; on exit SIGTERM it and check that no
    process it started is left behind."""
    port = free_port()
    log_path = tmp / f"launcher-{port}.log"
    limits = {  # small defaults; `extra` may give other values
        "--kv-cache-blocks": "256",
        "--max-input-length": "64",
        "--max-total-tokens": "128",
        "--max-batch-prefill-tokens": "512",
    }
    defaults = [arg for flag, value in limits.items() if flag not in extra for arg in (flag, value)]
    args = [
        str(BIN / "lorax-launcher"),
        "--model-id", str(model_dir),
        "--port", str(port),
        "--hostname", "127.0.0.1",
        "--shard-uds-path", str(tmp / f"shard-{port}"),
        *defaults,
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or its first probe is slow
                pass
            if time.time() > deadline:
                raise TimeoutError(f"server did not become healthy:\n{server.log()[-4000:]}")
            time.sleep(0.25)
        children = psutil.Process(proc.pid).children(recursive=True)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    leftovers = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, f"processes left behind after SIGTERM: {leftovers}"
    assert proc.returncode == 0, f"launcher exited with {proc.returncode}"


def greedy_ids(server: Server, prompt: str, new_tokens: int, **params: object) -> list[int]:
    """The token ids a greedy `/generate` returns (EOS ignored, so always `new_tokens` of them)."""
    parameters = {"max_new_tokens": new_tokens, "ignore_eos_token": True, "details": True, **params}
    r = requests.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with launch(llama_dir, tmp_path_factory.mktemp("run")) as s:
        yield s
