"""Attention backends behind one interface. The pure-torch backend runs anywhere and is the reference
that faster (CUDA) backends are tested against.

Interface: `attend(q, cache_k, cache_v, meta, scale, window, softcap, alibi_slopes) -> out`, called
after the layer has written this step's keys/values into the cache; every sequence attends to its first
`meta.context_lens[b]` cached tokens, causally. With `alibi_slopes` each head adds
`slope · (key position − query position)` to its scores (ALiBi, Bloom). A float8 cache (`--quantize
fp8-kv`) holds keys / `k_scale` and values / `v_scale`: a backend reads them back as `cached · scale` in
q's dtype; other caches ignore the scales.

Backends: `torch` (here), `triton` (`layers/triton/attention.py`, CUDA) and `flash` (`layers/flash_attention.py`,
over the `flash_attn` package); `select_backend` picks one once at start-up (`--attention-backend`).
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
from typing import Protocol

import torch
import torch.nn.functional as F

from ..forward import SHORT_QUERIES, ForwardBatch
from . import paged_attention


class AttentionBackend(Protocol):
    name: str

    def attend(
        self,
        q: torch.Tensor,  # [num_tokens, heads, head_dim]
        cache_k: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
        cache_v: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
        meta: ForwardBatch,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,  # [heads] float32
        k_scale: float = 1.0,  # float8 caches only
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [num_tokens, heads, head_dim]
        ...


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """ALiBi's per-head slopes [num_heads] (float32), as Bloom computes them: for the largest power of
    two n <= num_heads, slope_i = 2^(-8i/n) (i = 1..n); the remaining heads take the odd terms
    2^(-4i/n) (i = 1, 3, 5, ...) of the sequence for 2n heads."""
    n = 2 ** math.floor(math.log2(num_heads))

    def powers(base: float, exponents: range) -> torch.Tensor:  # float32 like the reference, bit for bit
        return torch.pow(torch.tensor(base, dtype=torch.float32), torch.tensor(exponents, dtype=torch.int32))

    slopes = powers(2.0 ** (-8.0 / n), range(1, n + 1))
    if n != num_heads:
        slopes = torch.cat([slopes, powers(2.0 ** (-4.0 / n), range(1, 2 * (num_heads - n), 2))])
    return slopes.to(device)


def padding_groups(seqs: list[int], q_lens: list[int], ctx: list[int], slack: float = 2.0) -> list[list[int]]:
    """Splits `seqs` into groups that are each padded to their own longest query and context, so that no
    group's padded grid (members × longest query × longest context) exceeds `slack` times the work its
    members need (Σ query × context). Prefix-cached prompts, whose short uncached suffixes would
    otherwise be padded to a full prompt's length, are the case this is for."""
    groups: list[list[int]] = []
    group: list[int] = []
    max_q = max_k = need = 0
    for i in sorted(seqs, key=lambda i: (q_lens[i], ctx[i])):
        q, k = max(max_q, q_lens[i]), max(max_k, ctx[i])
        if group and (len(group) + 1) * q * k > slack * (need + q_lens[i] * ctx[i]):
            groups.append(group)
            group, q, k, need = [], q_lens[i], ctx[i], 0
        group.append(i)
        max_q, max_k, need = q, k, need + q_lens[i] * ctx[i]
    if group:
        groups.append(group)
    return groups


class _PaddedLayout:
    """Per-forward tensors the torch backend derives once and reuses in every layer."""

    def __init__(self, meta: ForwardBatch, block_size: int) -> None:
        batch, device = meta.batch_size, meta.input_ids.device
        self.batch = batch
        self.max_q, self.max_k = meta.max_query_len, meta.max_context_len
        self.num_blocks = -(-self.max_k // block_size)
        self.tables = meta.block_tables[:, : self.num_blocks]  # [batch, num_blocks]
        self.context_lens = meta.context_lens
        offset = torch.arange(meta.input_ids.shape[0], device=device) - meta.query_start[meta.seq_index]
        self.q_index = meta.seq_index * self.max_q + offset  # [num_tokens] row in the padded query grid
        # Padded query slots sit at position 0 so they see key 0 and never produce NaN rows.
        q_pos = torch.zeros(batch * self.max_q, dtype=torch.int64, device=device)
        q_pos[self.q_index] = meta.positions
        self.q_pos = q_pos.view(batch, self.max_q, 1)  # [batch, max_q, 1]
        self.k_pos = torch.arange(self.max_k, device=device).view(1, 1, -1)  # [1, 1, max_k]
        # Built on first use: a decode step served by the paged kernel never needs them.
        self._masks: dict[int | None, torch.Tensor] = {}  # [batch, 1, max_q, max_k]
        self._biases: dict[tuple, torch.Tensor] = {}  # [batch, heads, max_q, max_k] additive ALiBi biases

    def mask(self, window: int | None) -> torch.Tensor:
        if None not in self._masks:
            causal = (self.k_pos <= self.q_pos) & (self.k_pos < self.context_lens.view(-1, 1, 1))
            self._masks[None] = causal.unsqueeze(1)
        if window not in self._masks:
            in_window = (self.q_pos - self.k_pos) < window
            self._masks[window] = self._masks[None] & in_window.unsqueeze(1)
        return self._masks[window]

    def alibi_bias(self, window: int | None, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive bias with ALiBi's `slope · (k − q)` (−inf where masked). Cached per
        head count: every layer of a model shares one set of slopes."""
        key = (window, slopes.shape[0], dtype)
        if key not in self._biases:
            distance = (self.k_pos - self.q_pos).unsqueeze(1).float()  # [batch, 1, max_q, max_k]
            bias = slopes.view(1, -1, 1, 1) * distance
            self._biases[key] = bias.masked_fill(~self.mask(window), float("-inf")).to(dtype)
        return self._biases[key]


class TorchAttention:
    """Gathers each sequence's cached keys into a padded grid and runs SDPA (or an explicit softmax
    when logits are soft-capped). With `cpu_kernels` (the default), float32 batches on the CPU are
    attended by `layers.paged_attention`'s kernels instead, which read the paged cache in place, when
    they are built (`LORAX_CPU_KERNELS=0` turns them off): decode steps and short queries by the decode
    kernel, steps with prompts in them by the prefill kernel.

    Without the kernels (other dtypes and devices, or the switch off), a batch is attended in groups,
    each padded to its own longest query and context: decoding sequences (one token each) apart from
    longer ones (prompts, chunks of prompts), and longer ones split by `padding_groups` where padding
    them together would more than double their work (short uncached suffixes of prefix-cached prompts
    next to full prompts)."""

    name = "torch"

    def __init__(self, block_size: int, cpu_kernels: bool = True) -> None:
        self.block_size = block_size
        self.cpu_kernels = cpu_kernels

    def _layouts(self, meta: ForwardBatch) -> list[tuple[torch.Tensor | None, _PaddedLayout]]:
        """(tokens of the group, or None for all; its layout), built once per forward pass."""
        layouts = meta.backend_state.get(self.name)
        if layouts is None:
            layouts = meta.backend_state[self.name] = self._group(meta)
        return layouts

    def _group(self, meta: ForwardBatch) -> list[tuple[torch.Tensor | None, _PaddedLayout]]:
        q_lens, ctx = meta.host_query_lens, meta.host_context_lens
        decoding = [i for i, n in enumerate(q_lens) if n == 1]
        longer = [i for i, n in enumerate(q_lens) if n > 1]
        groups = ([decoding] if decoding else []) + padding_groups(longer, q_lens, ctx)
        if len(groups) <= 1:
            return [(None, _PaddedLayout(meta, self.block_size))]
        device = meta.input_ids.device
        starts = list(itertools.accumulate(q_lens, initial=0))
        layouts = []
        for seqs in groups:
            tokens = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs]).to(device)
            sub = ForwardBatch.build(
                meta.input_ids[tokens],
                [q_lens[i] for i in seqs],
                [ctx[i] for i in seqs],
                meta.block_tables[torch.tensor(seqs, device=device)],
                self.block_size,
            )
            layouts.append((tokens, _PaddedLayout(sub, self.block_size)))
        return layouts

    def attend(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        meta: ForwardBatch,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        # Sequences of at most SHORT_QUERIES new tokens (speculative steps' drafts, short prompt pieces)
        # are attended token by token with the decode kernel when it applies, not through a padded grid.
        if 1 < meta.max_query_len <= SHORT_QUERIES and self._use_kernel(q, cache_k):
            # Each token as a decode query over its own prefix of the cache: a speculative step's
            # drafts are attended exactly as plain decoding would attend them, one step each.
            tables, lens = self._per_token(meta)
            return paged_attention.paged_decode_attention(
                q, cache_k, cache_v, tables, lens, scale, window, softcap, alibi_slopes
            )
        if meta.max_query_len > 1 and self._use_kernel(q, cache_k):
            # Prompts read the paged cache in place: no grid, no padding, however ragged the batch.
            return paged_attention.paged_prefill_attention(
                q, cache_k, cache_v, meta.block_tables, meta.query_start, meta.context_lens,
                scale, window, softcap, alibi_slopes,
            )  # fmt: skip
        groups = self._layouts(meta)
        args = (cache_k, cache_v, scale, window, softcap, alibi_slopes, k_scale, v_scale)
        if len(groups) == 1:
            return self._attend(q, groups[0][1], *args)
        out = torch.empty_like(q)
        for tokens, layout in groups:
            out[tokens] = self._attend(q[tokens], layout, *args)
        return out

    def _attend(
        self,
        q: torch.Tensor,
        layout: _PaddedLayout,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        scale: float,
        window: int | None,
        softcap: float | None,
        alibi_slopes: torch.Tensor | None,
        k_scale: float,
        v_scale: float,
    ) -> torch.Tensor:
        batch, heads, head_dim = layout.batch, q.shape[1], q.shape[2]
        kv_heads = cache_k.shape[2]
        decode = layout.max_q == 1  # one token per sequence: the padded grid is q itself
        if decode and self._use_kernel(q, cache_k):
            return paged_attention.paged_decode_attention(
                q, cache_k, cache_v, layout.tables, layout.context_lens, scale, window, softcap, alibi_slopes
            )
        q_grid = q if decode else q.new_zeros(batch * layout.max_q, heads, head_dim).index_copy_(0, layout.q_index, q)
        q_grid = q_grid.view(batch, layout.max_q, heads, head_dim).transpose(1, 2)  # [b, h, max_q, d]
        k = self._gather(cache_k, layout, batch, kv_heads, head_dim, q.dtype, k_scale)  # [b, kvh, max_k, d]
        v = self._gather(cache_v, layout, batch, kv_heads, head_dim, q.dtype, v_scale)
        if alibi_slopes is None:
            mask = layout.mask(window)  # bool
        else:
            mask = layout.alibi_bias(window, alibi_slopes, q.dtype)  # additive float
        if softcap is None:
            out = F.scaled_dot_product_attention(
                q_grid, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads
            )
        else:
            out = _softcapped_attention(q_grid, k, v, mask, scale, softcap)
        out = out.transpose(1, 2).reshape(batch * layout.max_q, heads, head_dim)
        return out if decode else out[layout.q_index]

    @staticmethod
    def _per_token(meta: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's block table and context length (its position + 1), once per forward pass."""
        state = meta.backend_state.get("per_token")
        if state is None:
            state = meta.backend_state["per_token"] = (meta.block_tables[meta.seq_index], meta.positions + 1)
        return state

    def _use_kernel(self, q: torch.Tensor, cache: torch.Tensor) -> bool:
        return self.cpu_kernels and paged_attention.kernel_applies(q, cache) and paged_attention.kernel_available()

    @staticmethod
    def _gather(
        cache: torch.Tensor,
        layout: _PaddedLayout,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        scale: float,
    ) -> torch.Tensor:
        # index_select on whole blocks copies contiguous rows: much faster than advanced indexing.
        blocks = cache.view(cache.shape[0], -1).index_select(0, layout.tables.reshape(-1))
        seq = blocks.view(batch, -1, kv_heads, head_dim)[:, : layout.max_k]
        if cache.dtype == torch.float8_e4m3fn:
            # Only the gathered blocks are widened, never the whole cache; × 1.0 would be exact, so skip it.
            seq = seq.to(dtype) if scale == 1.0 else seq.to(dtype) * scale
        return seq.transpose(1, 2)


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """q [b, h, q, d]; k, v [b, kvh, k, d]; scores = cap * tanh(qk^T * scale / cap); `mask` is boolean
    or an additive bias."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


BACKENDS = ("torch", "triton", "flash")


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (a package is missing, or no GPU)."""


def _imports(package: str) -> bool:
    # Importing, not just finding the package: an install that is present but broken (no driver, a
    # mismatched build) must not be chosen.
    try:
        importlib.import_module(package)
    except Exception:  # ImportError, or whatever a broken native extension raises on import
        return False
    return True


def select_backend(device: torch.device, block_size: int, name: str | None = None) -> AttentionBackend:
    """The attention backend, chosen once at start-up: `name` is one of `BACKENDS`; None picks the best
    available (Triton on CUDA when it imports, else torch). Raises `BackendUnavailable` when the named
    backend cannot run on `device`, `ValueError` for an unknown name."""
    if name is None:
        name = "triton" if device.type == "cuda" and _imports("triton") else "torch"
    if name == "torch":
        return TorchAttention(block_size)
    if name == "triton":
        if not _imports("triton"):
            raise BackendUnavailable("attention backend 'triton' needs the `triton` package, which does not import")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailable(
                "attention backend 'triton' needs a CUDA GPU (on the CPU only under TRITON_INTERPRET=1, "
                "Triton's interpreter, which is for tests); use --attention-backend torch"
            )
        from .triton.attention import TritonAttention

        return TritonAttention(block_size)
    if name == "flash":
        if not _imports("flash_attn"):
            raise BackendUnavailable(
                "attention backend 'flash' needs the `flash_attn` package (pip install flash-attn), which is not "
                "installed; use --attention-backend triton or torch"
            )
        if device.type != "cuda":
            raise BackendUnavailable("attention backend 'flash' needs a CUDA GPU; use --attention-backend torch")
        from .flash_attention import FlashAttention

        return FlashAttention(block_size)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
