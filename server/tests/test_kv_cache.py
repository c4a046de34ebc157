"""Block manager bookkeeping and slot mapping; host memory kept for the next step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorax_server.kv_cache import BlockManager, KVCache, OutOfBlocks, slot_mapping
from lorax_server.utils.memory import gpu_cache_budget


def test_allocate_rounds_up_to_blocks_and_free_returns_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(5)  # 2 blocks
    b = bm.allocate(4)  # 1 block
    assert len(a) == 2 and len(b) == 1 and not set(a) & set(b)
    assert bm.num_free == 5
    bm.free(a)
    assert a == [] and bm.num_free == 7


def test_tables_take_the_lowest_free_blocks_in_ascending_order_however_they_were_freed() -> None:
    """Freed blocks (tables free last block first, requests finish in any order) are handed out again
    lowest first: a long-running server's tables stay ascending and packed at the start of the cache."""
    bm = BlockManager(num_blocks=12, block_size=4)
    tables = [bm.allocate(12) for _ in range(4)]  # [0, 1, 2], [3, 4, 5], ...
    assert tables[1] == [3, 4, 5]
    for i in (2, 0, 3):
        bm.free(tables[i])
    assert bm.allocate(16) == [0, 1, 2, 6]
    assert bm.allocate(8) == [7, 8]
    bm.free(tables[1])
    assert bm.allocate(20) == [3, 4, 5, 9, 10]


def test_allocate_refuses_when_full_and_leaves_state_untouched() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate(8)
    assert not bm.can_allocate(5)
    with pytest.raises(OutOfBlocks):
        bm.allocate(5)
    assert bm.num_free == 1


def test_append_grows_only_at_block_boundaries() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate(3)
    assert bm.append(table, 4) == []
    added = bm.append(table, 5)
    assert len(added) == 1 and len(table) == 2
    with pytest.raises(OutOfBlocks):
        bm.append(table, 17)
    assert len(table) == 2


def test_fork_shares_blocks_until_both_owners_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(4)
    b = bm.fork(a)
    bm.free(a)
    assert bm.num_free == 2  # still held by the fork
    bm.free(b)
    assert bm.num_free == 4


def test_double_free_is_detected() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    a = bm.allocate(2)
    copy = list(a)
    bm.free(a)
    with pytest.raises(RuntimeError):
        bm.free(copy)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_slot_mapping_follows_block_tables(block_size: int) -> None:
    tables = torch.tensor([[5, 2, 7], [1, 0, 0]])
    seq_index = torch.tensor([0, 0, 0, 1, 1])
    positions = torch.tensor([0, block_size, 2 * block_size + 1 if block_size > 1 else 2, 0, block_size - 1])
    slots = slot_mapping(tables, seq_index, positions, block_size).tolist()
    expected = []
    for s, p in zip(seq_index.tolist(), positions.tolist(), strict=True):
        expected.append(tables[s, p // block_size].item() * block_size + p % block_size)
    assert slots == expected
    assert slots[0] == 5 * block_size and slots[3] == 1 * block_size


def test_cache_write_lands_in_the_mapped_slots() -> None:
    cache = KVCache(
        1, num_blocks=4, block_size=2, kv_heads=1, head_dim=3, dtype=torch.float32, device=torch.device("cpu")
    )
    k = torch.arange(6.0).view(2, 1, 3)
    cache.write(0, torch.tensor([5, 0]), k, -k)
    assert torch.equal(cache.keys[0][2, 1, 0], k[0, 0]) and torch.equal(cache.values[0][0, 0, 0], -k[1, 0])
    assert cache.keys[0].abs().sum() == k.abs().sum()


def test_gpu_cache_budget_keeps_the_prefill_peak_the_fraction_and_the_adapters_share() -> None:
    gib = 2**30
    # 80 GiB device, 60 free after the weights; the largest prefill peaked at 4 GiB; adapters may
    # still grow by 2 GiB.
    assert gpu_cache_budget(60 * gib, 80 * gib, 1.0, 4 * gib, 2 * gib) == 54 * gib
    # --cuda-memory-fraction 0.5: 40 GiB of the device are not this shard's.
    assert gpu_cache_budget(60 * gib, 80 * gib, 0.5, 4 * gib, 2 * gib) == 14 * gib
    assert gpu_cache_budget(10 * gib, 80 * gib, 0.5, 4 * gib, 0) == 0  # nothing left: never negative


_WHERE_A_LARGE_TEMPORARY_LIVES = """
import ctypes, torch
from lorax_server.utils.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc's mallinfo2(3): every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
kept = keep_freed_memory()
before = mallinfo2().hblkhd  # bytes in blocks mapped for themselves
x = torch.ones(16 * 2**20)  # 64 MiB: a large prefill's temporary
mapped = mallinfo2().hblkhd - before
del x
print(kept, mapped, mallinfo2().arena)  # the heap's size once it is freed
"""


@pytest.mark.parametrize("keep", ["1", "0"])
def test_the_shard_keeps_memory_a_step_frees_for_the_next_step(keep: str) -> None:
    """A step's large temporaries come from the heap and stay there once freed, so they are not mapped,
    faulted in and unmapped again every step (glibc's defaults map any block over 32 MiB for itself);
    LORAX_KEEP_FREED_MEMORY=0 restores the defaults."""
    out = subprocess.run(
        [sys.executable, "-c", _WHERE_A_LARGE_TEMPORARY_LIVES],
        env={**os.environ, "LORAX_KEEP_FREED_MEMORY": keep},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    kept, mapped, heap = out[0] == "True", int(out[1]), int(out[2])
    assert kept == (keep == "1")
    if kept:
        assert mapped < 2**20 and heap >= 64 * 2**20, (mapped, heap)
    else:
        assert mapped >= 64 * 2**20, mapped
