"""Paged attention in one Triton kernel: decode rows (one new token) and prompt rows (many, causal,
after any earlier cached tokens: prefix-cache hits, chunks of a prompt) in the same launch, reading
the paged KV cache in place through the block tables.

Semantics are `layers.attention.TorchAttention`'s, which is the reference in the tests: query token t
of sequence b sits at position `context_lens[b] - query_len[b] + t` and attends to the cached positions
k with `k <= position` (and `position - k < window` with a sliding window). Scores are
`qk·scale`, then `cap·tanh(s/cap)` with soft-capping, then `+ slope·(k − position)` with ALiBi, then
masked; the softmax runs online in float32.

Work split: the grid is (query block, kv head). A query block is up to BLOCK_Q consecutive new tokens
of one sequence; its program computes them for every query head that shares the kv head (GQA/MQA), so
each key/value tile is loaded once for the whole group and decode rows fill the matrix unit with the
group's heads. The list of query blocks is built on the device once per forward pass (see
`_WorkList`): no host sync, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...forward import ForwardBatch

# Rows of the score matrix per program: 16 is the smallest tile the matrix units take; a prompt's
# longer query blocks reuse each key tile for more rows.
DECODE_ROWS = 16
PROMPT_ROWS = 64
# Kernels defined under TRITON_INTERPRET=1 run in Triton's CPU interpreter, whose tl.dot misreads
# bfloat16 operands (numpy has no bfloat16): there the dots take the operands widened to float32,
# which gives the same products (bf16 × bf16 is exact in float32) with float32 accumulation.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tanh(x):
    # Written out because tl has no tanh that runs both in the interpreter and on CUDA. exp(-2|x|)
    # never overflows: it goes to 0 for large |x|, where tanh saturates at ±1.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    if WIDEN:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _tile_scores(
    q,  # [M, HEAD_PAD] in q's dtype
    k_cache_ptr,
    table_row_ptr,  # this sequence's block table row
    kv_head,
    pos,  # [TILE] key positions
    pos_ok,  # [TILE] positions inside the sequence's context (only these are ever read)
    q_pos,  # [M] query positions
    slopes,  # [M] float32 ALiBi slopes (unused without ALiBi)
    dims,
    dim_ok,
    scale,
    softcap,
    window,
    k_scale,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    PAGE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """Masked float32 scores [M, TILE] of one key tile, and the tile's cache offsets [TILE]."""
    page = tl.load(table_row_ptr + pos // PAGE, mask=pos_ok, other=0).to(tl.int64)
    rows = page * stride_k_block + (pos % PAGE) * stride_k_slot + kv_head * stride_k_head  # [TILE]
    k = tl.load(k_cache_ptr + rows[None, :] + dims[:, None], mask=dim_ok[:, None] & pos_ok[None, :], other=0.0)
    if FP8:  # stored as k / k_scale: widen and rescale, then compute in q's dtype like the reference
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
    s = _dot(q, k.to(q.dtype), PRECISION, WIDEN) * scale  # [M, TILE] float32
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    if USE_ALIBI:
        s += slopes[:, None] * (pos[None, :] - q_pos[:, None]).to(tl.float32)
    mask = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
    if USE_WINDOW:
        mask = mask & ((q_pos[:, None] - pos[None, :]) < window)
    return tl.where(mask, s, float("-inf")), page


@triton.jit
def _accumulate(
    s,  # [M, TILE] float32 masked scores
    q,  # [M, HEAD_PAD]: only its dtype is used
    page,  # [TILE] int64 cache block of each key position
    pos,
    pos_ok,
    m_i,  # [M] running maximum
    l_i,  # [M] running denominator
    acc,  # [M, HEAD_PAD] float32 running numerator
    v_cache_ptr,
    kv_head,
    dims,
    dim_ok,
    v_scale,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    PAGE: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """One online-softmax step over a key tile: the updated (m_i, l_i, acc)."""
    # A row with nothing visible yet keeps m = -inf, so its exponents are taken against 0 instead.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    rows = page * stride_v_block + (pos % PAGE) * stride_v_slot + kv_head * stride_v_head
    v = tl.load(v_cache_ptr + rows[:, None] + dims[None, :], mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
    if FP8:
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), PRECISION, WIDEN)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,  # out, q [tokens, heads, d]; caches [blocks, PAGE, kv_heads, d]
    tables_ptr, query_start_ptr, query_lens_ptr, context_lens_ptr,  # per sequence
    work_seq_ptr, work_first_ptr,  # per program: see _WorkList
    slopes_ptr,  # [heads] float32 ALiBi slopes
    scale, softcap, window, k_scale, v_scale,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head, stride_table,
    head_dim,
    PAGE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_PAD: tl.constexpr, TILE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, FP8: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    work = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(work_seq_ptr + work)
    first = tl.load(work_first_ptr + work)  # first new token of the block in its sequence; -1: idle
    # An idle program sees no new tokens. (The interpreter mis-types `vector & scalar` booleans, so
    # the scalar condition is folded into the length.)
    q_len = tl.where(first >= 0, tl.load(query_lens_ptr + seq), 0)
    ctx = tl.load(context_lens_ptr + seq)
    q_start = tl.load(query_start_ptr + seq)
    # Row r of the tile is token first + r // GROUP_PAD, query head kv_head·GROUP + r % GROUP_PAD.
    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = first + r // GROUP_PAD
    in_group = r % GROUP_PAD
    head = kv_head * GROUP + in_group
    row_ok = (in_group < GROUP) & (tok >= 0) & (tok < q_len)
    q_pos = ctx - q_len + tok
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < head_dim
    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    slopes = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(slopes_ptr + head, mask=in_group < GROUP, other=0.0)
    # Keys the block's rows can see: up to its last token (causal), from its first token's window.
    kv_hi = tl.where(first >= 0, ctx - q_len + tl.minimum(first + BLOCK_Q, q_len), 0)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(ctx - q_len + first - window + 1, 0)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    table_row_ptr = tables_ptr + seq.to(tl.int64) * stride_table
    for tile_start in range((kv_lo // TILE) * TILE, kv_hi, TILE):
        pos = tile_start + tl.arange(0, TILE)
        pos_ok = (pos < kv_hi) & (pos >= 0)
        s, page = _tile_scores(
            q, k_cache_ptr, table_row_ptr, kv_head, pos, pos_ok, q_pos, slopes, dims, dim_ok,
            scale, softcap, window, k_scale, stride_k_block, stride_k_slot, stride_k_head,
            PAGE, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, FP8, PRECISION, WIDEN,
        )  # fmt: skip
        m_i, l_i, acc = _accumulate(
            s, q, page, pos, pos_ok, m_i, l_i, acc, v_cache_ptr, kv_head, dims, dim_ok, v_scale,
            stride_v_block, stride_v_slot, stride_v_head, PAGE, FP8, PRECISION, WIDEN,
        )  # fmt: skip
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = (q_start + tok).to(tl.int64)[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@dataclass
class _WorkList:
    """The forward pass's query blocks, one per program along the grid's first axis. Built with device
    ops only: the grid size comes from shapes (an upper bound), and the surplus programs are idle."""

    tables: torch.Tensor  # [batch, max_blocks] the block tables, rows contiguous
    query_lens: torch.Tensor  # [batch] int32
    seq: torch.Tensor  # [programs] int32, the block's sequence (a valid index even when idle)
    first: torch.Tensor  # [programs] int32, the block's first new token in its sequence; -1 when idle

    @classmethod
    def build(cls, meta: ForwardBatch, block_q: int) -> _WorkList:
        num_tokens, batch = meta.input_ids.shape[0], meta.batch_size
        starts = meta.query_start
        ends = torch.cat([starts[1:], starts.new_full((1,), num_tokens)])
        query_lens = ends - starts  # [batch]
        blocks = (query_lens + block_q - 1) // block_q  # [batch] query blocks of each sequence
        block_end = torch.cumsum(blocks, 0)
        # Σ ceil(q_b / block_q) <= num_tokens // block_q + batch, and <= num_tokens (q_b >= 1).
        programs = min(num_tokens, num_tokens // block_q + batch)
        work = torch.arange(programs, device=starts.device)
        seq = torch.searchsorted(block_end, work, right=True)
        idle = seq >= batch
        seq = seq.clamp(max=batch - 1)
        first = torch.where(idle, -1, (work - (block_end - blocks)[seq]) * block_q)
        tables = meta.block_tables if meta.block_tables.stride(-1) == 1 else meta.block_tables.contiguous()
        return cls(tables, query_lens.to(torch.int32), seq.to(torch.int32), first.to(torch.int32))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class TritonAttention:
    """`AttentionBackend` over the Triton kernel above; any device Triton runs on (CUDA, or the CPU
    under `TRITON_INTERPRET=1`)."""

    name = "triton"

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def _work(self, meta: ForwardBatch, block_q: int) -> _WorkList:
        # Once per forward pass (per query-block size): every layer reuses it.
        key = (self.name, block_q)
        if key not in meta.backend_state:
            meta.backend_state[key] = _WorkList.build(meta, block_q)
        return meta.backend_state[key]

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
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [num_tokens, heads, head_dim]
        num_tokens, heads, head_dim = q.shape
        kv_heads = cache_k.shape[2]
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot share {kv_heads} kv heads")
        out = torch.empty(num_tokens, heads, head_dim, dtype=q.dtype, device=q.device)
        if num_tokens == 0:
            return out
        if q.stride(-1) != 1:
            q = q.contiguous()
        group = heads // kv_heads
        group_pad = _next_power_of_2(group)
        rows = DECODE_ROWS if meta.max_query_len == 1 else PROMPT_ROWS
        block_q = max(1, rows // group_pad)
        work = self._work(meta, block_q)
        tables = work.tables
        _paged_attention_kernel[(work.seq.shape[0], kv_heads)](
            out, q, cache_k, cache_v, tables, meta.query_start, work.query_lens, meta.context_lens,
            work.seq, work.first, alibi_slopes if alibi_slopes is not None else q,
            scale, softcap or 1.0, window or 0, k_scale, v_scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
            cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
            tables.stride(0), head_dim,
            PAGE=cache_k.shape[1], GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q,
            HEAD_PAD=max(16, _next_power_of_2(head_dim)), TILE=max(16, _next_power_of_2(cache_k.shape[1])),
            USE_WINDOW=window is not None, USE_SOFTCAP=softcap is not None, USE_ALIBI=alibi_slopes is not None,
            FP8=cache_k.dtype == torch.float8_e4m3fn, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            WIDEN=INTERPRETED and q.dtype == torch.bfloat16,
        )  # fmt: skip
        return out
