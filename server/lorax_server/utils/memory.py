"""Memory accounting: freed host memory given back to the OS, the KV cache's share of a GPU."""

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


def gpu_cache_budget(free: int, total: int, fraction: float, prefill_peak: int, adapter_reserve: int) -> int:
    """Bytes the KV cache may take on a GPU, measured after the warm-up's largest prefill: what is free,
    less the part of the whole device that `fraction` (--cuda-memory-fraction) keeps from this shard,
    less that prefill's peak (freed by the time this is measured, needed again by every large prefill),
    less what the adapters' share has not used yet."""
    return max(0, int(free - (1 - fraction) * total - prefill_peak - adapter_reserve))
