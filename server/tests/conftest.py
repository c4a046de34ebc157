"""Shared pytest fixtures for the shard's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from fake_hub import FakeHub

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads the switch when a kernel is
# defined, so it is set here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def lora_torch_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA through the torch plans (the grid, the segment loop) instead of the CPU kernel that would
    otherwise take float32 CPU tensors: for tests of those plans, and as the kernel's reference."""
    from lorax_server.adapters import lora_cpu

    monkeypatch.setattr(lora_cpu, "kernel_applies", lambda y, x: False)


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    """A local server speaking the Hub's download API; unpacks as ``(url, repos_dir, add_repo)``.

    Point ``HF_ENDPOINT`` at ``url``. ``add_repo(repo_id, files, private=False, token=None, gated=False)``
    creates a repo from ``{path: bytes}``. The object also has ``requests`` (every ``(method, path)``
    served), ``downloaded(repo_id)`` (files fetched) and ``stop()``.
    """
    hub = FakeHub(tmp_path / "fake_hub_repos").start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def hub_env(fake_hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point every hub setting at the fake hub and a temp cache; no ambient token or offline flag."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for var in ("HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads these once at import. Our code passes the endpoint explicitly (patching
    # constants.ENDPOINT would break the library's URL rewriting); telemetry off stops its one request
    # to constants.ENDPOINT, and no implicit token keeps a stored login out of the requests.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    return fake_hub


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (GQA: 4 query heads, 2 KV heads) with a byte-level BPE tokenizer."""
    from tiny_models import make_llama

    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mistral whose sliding window (6) is shorter than the test sequences."""
    from tiny_models import make_mistral

    return make_mistral(tmp_path_factory.mktemp("mistral"))
