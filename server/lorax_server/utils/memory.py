"""Host memory: giving freed memory back to the operating system, or keeping it for the next step."""

from __future__ import annotations

import ctypes
import os


def return_freed_memory() -> None:
    """Hand memory freed by large temporaries (dense weights replaced by quantized ones at load, the
    warm-up's activations) back to the OS. glibc keeps freed heap memory and raises its mmap threshold
    after large frees, so without this the process stays at its peak size although nothing uses it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap and are reused
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS after every free.

    A decode step allocates and frees the same large temporaries (activations, LoRA grids) every
    step. With glibc's defaults, blocks above its mmap threshold are mapped and unmapped each time,
    and freed heap tops are trimmed, so every step page-faults its temporaries in again: measured
    (bench/cpu_settings.py) as a third of the step time with 8 adapters on the bench model. The
    process then stays at its working size; `return_freed_memory` still trims on request.

    Skipped when `LORAX_MALLOC_TUNING=0` or any `MALLOC_*` variable sets glibc's own tuning; returns
    whether the settings were applied."""
    if os.environ.get("LORAX_MALLOC_TUNING", "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
