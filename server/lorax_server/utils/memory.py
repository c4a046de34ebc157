"""Giving freed host memory back to the operating system."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Hand memory freed by large temporaries (dense weights replaced by quantized ones at load, the
    warm-up's activations) back to the OS. glibc keeps freed heap memory and raises its mmap threshold
    after large frees, so without this the process stays at its peak size although nothing uses it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
