"""Attention over the paged KV cache without gathering it: the C++ kernels in `csrc/paged_attention.cpp`
for float32 CPU tensors (built by `utils.cpu_extension`), one for decode steps and one for prompts.

The torch backend (`layers.attention.TorchAttention`) calls them when they are available, and its own
gather-and-SDPA path is the reference the kernels are tested against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils.cpu_extension import CpuExtension

EXTENSION = CpuExtension(
    "lorax_paged_attention",
    Path(__file__).resolve().parent / "csrc" / "paged_attention.cpp",
    "lorax_attention",
    "CPU paged attention kernel",
)


def kernel_available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call)."""
    return EXTENSION.ops() is not None


def kernel_applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """The kernel's domain: float32 queries and cache on the CPU."""
    return q.is_cpu and q.dtype == torch.float32 and cache.dtype == torch.float32


def paged_decode_attention(
    q: torch.Tensor,  # [batch, heads, head_dim]: one query token per sequence
    cache_k: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    cache_v: torch.Tensor,
    block_tables: torch.Tensor,  # [batch, blocks]
    context_lens: torch.Tensor,  # [batch]; the query sits at position context_len - 1
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,  # [heads]
) -> torch.Tensor:  # [batch, heads, head_dim]
    """Requires `kernel_available()` and `kernel_applies(q, cache_k)`."""
    return EXTENSION.ops().paged_decode_attention(
        q, cache_k, cache_v, block_tables, context_lens, scale, window or 0, softcap or 0.0, alibi_slopes
    )


def paged_prefill_attention(
    q: torch.Tensor,  # [tokens, heads, head_dim]: each sequence's new tokens, end to end
    cache_k: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    cache_v: torch.Tensor,
    block_tables: torch.Tensor,  # [batch, blocks]
    query_start: torch.Tensor,  # [batch]: each sequence's first row in q
    context_lens: torch.Tensor,  # [batch]; a sequence's new tokens are its last ones
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,  # [heads]
) -> torch.Tensor:  # [tokens, heads, head_dim]
    """Causal attention of every new token over its sequence's cache (prompts, chunks of prompts,
    prompts behind a cached prefix; one-token sequences are attended as decode steps attend them).
    Requires `kernel_available()` and `kernel_applies(q, cache_k)`."""
    return EXTENSION.ops().paged_prefill_attention(
        q, cache_k, cache_v, block_tables, query_start, context_lens, scale, window or 0, softcap or 0.0, alibi_slopes
    )
