"""glibc malloc settings for the decode loop (utils/memory.py)."""

from __future__ import annotations

import ctypes
import os

import pytest

from lorax_server.utils import memory


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not glibc(), reason="glibc only")
def test_settings_apply_unless_switched_off_or_tuned_by_the_user(monkeypatch: pytest.MonkeyPatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_") or k == "LORAX_MALLOC_TUNING"]:
        monkeypatch.delenv(key)
    assert memory.keep_freed_memory()
    monkeypatch.setenv("LORAX_MALLOC_TUNING", "0")
    assert not memory.keep_freed_memory()
    monkeypatch.delenv("LORAX_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user's own glibc tuning wins
    assert not memory.keep_freed_memory()
