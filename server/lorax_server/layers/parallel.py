"""Tensor parallelism: this rank's place in the group, the collectives the model runs, and which
slice of each sharded weight a rank holds.

Megatron's layout: q/k/v and gate/up are column-parallel (a rank holds some heads, some intermediate
rows), o/down row-parallel (the matching input columns; one all-reduce sums the partial outputs), the
embedding and LM head vocab-parallel. A `LinearShard` records where a rank's slice sits in the whole
weight, so that LoRA factors are sliced the same way (S-LoRA): B by output rows for column-parallel
linears, A by input columns for row-parallel ones, whose partial low-rank updates then ride on the
base all-reduce.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

Range = tuple[int, int]  # (start, size) along one dimension of the whole tensor


class ShardingError(ValueError):
    """The model cannot be split over this many ranks; the message names the number that does not divide."""


class TensorParallel:
    """This rank within the group and the collectives over it; a group of one runs none."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")  # where collectives' own tensors live (NCCL: the GPU)
        # Since start, for benchmarks: the collectives this rank ran and the bytes it contributed to them.
        self.collectives = self.collective_bytes = 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns it."""
        if self.sharded:
            self._count(x)
            dist.all_reduce(x)
        return x

    def all_reduce_min(self, value: int) -> int:
        """The smallest `value` any rank holds (ranks agree on sizes they measured separately)."""
        if not self.sharded:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._count(t)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Concatenate every rank's x [n, cols] along the last dim into [n, total]; ranks holding
        fewer columns than the first (an uneven vocabulary split) are padded, the padding dropped."""
        if not self.sharded:
            return x
        block = -(-total // self.world_size)
        if x.shape[-1] < block:
            x = torch.nn.functional.pad(x, (0, block - x.shape[-1]))
        self._count(x)
        pieces = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(pieces, x.contiguous())
        return torch.cat(pieces, dim=-1)[..., :total]

    def _count(self, x: torch.Tensor) -> None:
        self.collectives += 1
        self.collective_bytes += x.numel() * x.element_size()

    # ------------------------------------------------------------------ who holds what
    def split(self, size: int, what: str) -> Range:
        """This rank's equal share of `size` items (heads, intermediate rows, experts' rows)."""
        if size % self.world_size:
            raise ShardingError(f"{what} ({size}) does not divide over {self.world_size} shards")
        share = size // self.world_size
        return self.rank * share, share

    def kv_heads(self, kv_heads: int, heads: int) -> Range:
        """The kv heads this rank's query heads read. With fewer kv heads than ranks, each is
        replicated on the ranks whose query heads share it (kv_heads must divide the ranks)."""
        if kv_heads >= self.world_size:
            return self.split(kv_heads, "the number of key/value heads")
        if self.world_size % kv_heads:
            raise ShardingError(
                f"the number of key/value heads ({kv_heads}) neither divides over {self.world_size} shards "
                f"nor divides {self.world_size}, so they cannot be replicated evenly"
            )
        first_head, _ = self.split(heads, "the number of attention heads")
        return first_head * kv_heads // heads, 1

    def vocab(self, vocab_size: int) -> Range:
        """This rank's rows of the embedding and LM head: blocks of ceil(vocab / ranks)."""
        block = -(-vocab_size // self.world_size)
        start = min(self.rank * block, vocab_size)
        size = min(block, vocab_size - start)
        if size <= 0:
            raise ShardingError(
                f"a vocabulary of {vocab_size} tokens leaves rank {self.rank} of {self.world_size} no rows"
            )
        return start, size


SINGLE = TensorParallel()


@dataclass(frozen=True)
class LinearShard:
    """Where a sharded linear's slice sits in the whole weight.

    Column-parallel: `rows[p]` are the ranges of part p's output rows this rank holds, in the order
    its output lays them out (a checkpoint-fused q|k|v part holds three). Row-parallel: `cols` is the
    range of input columns this rank holds."""

    full_in_features: int
    full_part_sizes: tuple[int, ...]
    rows: tuple[tuple[Range, ...], ...] | None = None
    cols: Range | None = None

    def lora(self, part: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a LoRA update of part `part`: A [rank, in], B [out, rank] as the adapter stores them."""
        if self.cols is not None:
            start, size = self.cols
            lora_a = lora_a[:, start : start + size]
        if self.rows is not None:
            lora_b = torch.cat([lora_b[start : start + size] for start, size in self.rows[part]])
        return lora_a.contiguous(), lora_b.contiguous()


def init_process_group(rank: int, world_size: int, device: torch.device, timeout_s: float = 300.0) -> TensorParallel:
    """Join the ranks' `torch.distributed` group (gloo on CPU, NCCL on CUDA) from the launcher's
    MASTER_ADDR/MASTER_PORT; a group of one needs none. `timeout_s` bounds the wait for the other
    ranks (at start-up, and in a collective when one of them is gone)."""
    tp = TensorParallel(rank, world_size, device)
    if tp.sharded and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank's communicator to its current GPU
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return tp
