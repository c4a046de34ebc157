"""Shared pytest fixtures for the shard's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub


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
