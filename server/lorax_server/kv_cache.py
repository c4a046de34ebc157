"""Paged KV cache: a pure block manager (which blocks belong to whom) and the per-layer cache tensors."""

from __future__ import annotations

import heapq
from collections import OrderedDict

import torch


class OutOfBlocks(RuntimeError):
    """Not enough free KV cache blocks for the request."""


class BlockManager:
    """Hands out fixed-size KV cache blocks; ref counts let sequences share blocks (best_of forks, and
    prompt prefixes under prefix caching).

    Prefix caching: a full block of prompt tokens is registered under its hash (see `prefix_cache`)
    once its keys and values are written. A later sequence whose prompt starts with the same blocks
    takes a reference on them (`match`) instead of computing them again. A registered block nobody
    references is kept as long as it can be: it counts as free, and is recycled, least recently used
    first, only when no never-used block is left.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Free blocks holding no cached prefix, a min-heap: a table takes the lowest free blocks, so it is
        # ascending and mostly contiguous however long the server has run. Handed out first-in first-out
        # instead, freed blocks came back in reverse and scattered once the pool had wrapped, and a decode
        # step reading its tables went from 13.3 to 15.4-17.6 ms (bench model, 64 requests; bench/RESULTS.md).
        self._free: list[int] = list(range(num_blocks))
        self._refs = [0] * num_blocks
        self._by_hash: dict[bytes, int] = {}  # registered prefix blocks
        self._hash_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; LRU first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Registered prefix blocks (referenced or not)."""
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def _take(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} more KV cache blocks, {self.num_free} free")
        taken = []
        for _ in range(n):
            if self._free:
                block = heapq.heappop(self._free)
            else:  # recycle the least recently used cached prefix block
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self._refs[block] = 1
            taken.append(block)
        return taken

    def allocate(self, num_tokens: int) -> list[int]:
        """A new block table with room for `num_tokens` tokens."""
        needed = self.blocks_for(num_tokens)
        if needed > self.num_free:
            raise OutOfBlocks(f"need {needed} KV cache blocks, {self.num_free} free")
        return self._take(needed)

    def append(self, table: list[int], num_tokens: int) -> list[int]:
        """Grow `table` in place so it holds `num_tokens` tokens; returns the blocks added."""
        extra = self.blocks_for(num_tokens) - len(table)
        if extra <= 0:
            return []
        added = self._take(extra)
        table.extend(added)
        return added

    def fork(self, table: list[int]) -> list[int]:
        """A second owner of the same blocks (copy-on-write is the caller's business)."""
        for block in table:
            self._refs[block] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        # Last block first: of a cached prefix, the tail is then recycled before the blocks that lead
        # to it (a prefix whose first block is gone cannot be matched at all).
        for block in reversed(table):
            if self._refs[block] <= 0:
                raise RuntimeError(f"block {block} freed twice")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None  # most recently used last
                else:
                    heapq.heappush(self._free, block)
        table.clear()

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of leading `hashes`, each now referenced once more."""
        table = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            table.append(block)
        return table

    def register(self, blocks: list[int], hashes: list[bytes]) -> list[int]:
        """Make full blocks reusable under their prefix hashes; returns the blocks newly registered. A
        hash already registered keeps its block."""
        added = []
        for block, h in zip(blocks, hashes, strict=False):
            if h not in self._by_hash and block not in self._hash_of:
                self._by_hash[h] = block
                self._hash_of[block] = h
                added.append(block)
        return added

    def unregister(self, blocks: list[int]) -> None:
        """Undo `register` for blocks whose contents were never written (a failed forward pass)."""
        for block in blocks:
            h = self._hash_of.pop(block, None)
            if h is None:
                continue
            del self._by_hash[h]
            if block in self._evictable:
                del self._evictable[block]
                heapq.heappush(self._free, block)


def slot_mapping(
    block_tables: torch.Tensor, seq_index: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Cache slot of each token.

    block_tables [batch, max_blocks]; seq_index, positions [num_tokens] → slots [num_tokens].
    """
    blocks = block_tables[seq_index, torch.div(positions, block_size, rounding_mode="floor")]
    return blocks * block_size + positions % block_size


# `--quantize fp8-kv`'s cache format: keys and values stored as float8_e4m3fn after division by a per-layer
# scale (vLLM's convention); the attention backend multiplies the scale back after gathering blocks.
FP8_KV = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8_KV).max  # 448: e4m3fn has no infinity, so larger values are saturated here


def to_fp8_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as float8_e4m3fn, saturated at ±448 rather than relying on the cast (which may turn an
    out-of-range value into NaN on some backends)."""
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_KV)


class KVCache:
    """Per layer `[num_blocks, block_size, kv_heads, head_dim]` key and value tensors, in the model's dtype
    or, for `--quantize fp8-kv`, in float8_e4m3fn (see `write`)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # Zeroed, not empty: attention reads whole blocks and masks the unused slots, and 0 * NaN
        # garbage would still poison the weighted sum.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        """slots [num_tokens]; k, v [num_tokens, kv_heads, head_dim]. A float8 cache stores k / k_scale
        and v / v_scale; any other cache stores k and v as they are and ignores the scales."""
        kv_heads, head_dim = k.shape[1], k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        if self.dtype == FP8_KV:
            # index_copy_ has no float8 kernel on CPU: copy the bytes through uint8 views instead.
            keys, values = keys.view(torch.uint8), values.view(torch.uint8)
            k, v = to_fp8_kv(k, k_scale).view(torch.uint8), to_fp8_kv(v, v_scale).view(torch.uint8)
        keys.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
        values.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
