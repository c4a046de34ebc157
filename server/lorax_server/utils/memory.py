"""Memory accounting: freed host memory given back to the OS, the KV cache's share of a GPU."""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Make glibc keep the memory a step frees for the next step, on the CPU where activations live in
    host memory. By default an allocation above its mmap threshold (128 KiB, raised after frees up to
    32 MiB) is mapped for the call and unmapped when freed, and a freed heap top above the trim threshold
    goes back to the OS, so a large prefill's temporaries are faulted in again every step: 0.5-1 s of
    system time in a 1.2-1.9 s prefill of 63 prompts (bench/RESULTS.md, session 14). Here blocks up to
    256 MiB come from the heap and up to 1 GiB of freed heap stays mapped; `return_freed_memory` still
    trims it on demand. Off with LORAX_KEEP_FREED_MEMORY=0; False where it is off or not glibc."""
    if os.environ.get("LORAX_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, 256 * 2**20), (_M_TRIM_THRESHOLD, 2**30), (_M_TOP_PAD, 64 * 2**20))
    return all(mallopt(param, value) == 1 for param, value in settings)


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
