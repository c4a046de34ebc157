"""Multi-LoRA kernels: SGMV for prompts (tokens in segments, one adapter each) and BGMV for decode
steps (one adapter slot per token), each beside the plain-torch function with the same signature that
is its oracle in tests (`TRITON_INTERPRET=1` runs the kernels on the CPU).

An adapted linear runs one shrink (x·A for every part at once) and one expand per part (fused q|k|v,
gate|up): y[t, out_offset : out_offset + out_size] += shrunk[t, part's columns] · B.

Layouts (`adapters.lora.LoraSlots` stacks them once per set of adapters and keeps them):
    x        [tokens, in]             activations
    a_stack  [slots, in, R]           each slot's A of every part, transposed, the parts side by side
                                      along R, each padded with zeros to the largest rank that part has
                                      in the stack (zeros too where the slot's adapter skips the part)
    shrunk   [tokens, R]              x·A of each token's slot, in x's dtype; zeros for tokens without one
    b_stack  [slots, r, out_size]     one part's B, transposed, scale folded in; zero rows beyond each
                                      adapter's rank, all zeros where the adapter skips the part
    y        [tokens, out_features]   updated in place, columns out_offset : out_offset + out_size
Segments (SGMV): seg_start, seg_end, seg_slot int32 [segments]: token ranges and their stack slots.
Rows (BGMV): row_slot int32 [tokens]: each token's stack slot. A slot of -1 adds nothing.
Any strides are accepted (the expand reads a part's columns as a view of `shrunk`).

Products accumulate in float32; dots use "ieee" precision so float32 models stay exact on GPUs (tf32
would cost the 1e-4 parity with the torch path). The SGMV grid needs the longest segment: callers pass
it from their host-side segments (`max_len`) so that a launch never waits on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Smallest tile edge tl.dot accepts on GPUs; the interpreter would take less, but tests must run the
# shapes the GPU runs.
_MIN_DOT = 16


def _tile(n: int, largest: int, smallest: int = _MIN_DOT) -> int:
    return max(smallest, min(largest, triton.next_power_of_2(max(n, 1))))


# A shrink and an expand are the same product, y[rows, out_offset + n] (+)= x[rows, :K] · w[slot][:K, n]:
# the shrink (x·A into a new tensor) stores it, the expand (shrunk·B into a part's columns) adds it.


@triton.jit
def _sgmv_kernel(
    x_ptr, w_ptr, y_ptr, seg_start_ptr, seg_end_ptr, seg_slot_ptr,
    K, N, out_offset, sxm, sxk, sws, swk, swn, sym, syn,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Program (segment, block of its tokens, block of N): tokens past the segment's end exit at once.
    # Segments never overlap, so every output cell has one owner: a plain read-add-write, no atomics.
    seg = tl.program_id(0)
    first = tl.load(seg_start_ptr + seg) + tl.program_id(1) * BLOCK_M
    end = tl.load(seg_end_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    if (slot < 0) | (first >= end):
        return
    rows = (first + tl.arange(0, BLOCK_M)).to(tl.int64)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < end
    n_ok = ns < N
    w_base = w_ptr + slot.to(tl.int64) * sws
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xt = tl.load(x_ptr + rows[:, None] * sxm + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + ks[:, None] * swk + ns[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(xt, wt.to(xt.dtype), input_precision="ieee")
    mask = row_ok[:, None] & n_ok[None, :]
    out = y_ptr + rows[:, None] * sym + (out_offset + ns)[None, :] * syn
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bgmv_kernel(
    x_ptr, w_ptr, y_ptr, row_slot_ptr,
    K, N, out_offset, sxm, sxk, sws, swk, swn, sym, syn,
    ACCUMULATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Program (token, block of N): a matrix-vector product against the token's own slot's factor. One
    # token is too few rows for tl.dot's tiles, so the product is a broadcast multiply and a sum.
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(row_slot_ptr + row)
    if slot < 0:
        return
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    w_base = w_ptr + slot.to(tl.int64) * sws
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xv = tl.load(x_ptr + row * sxm + ks * sxk, mask=k_ok, other=0.0).to(tl.float32)
        wt = tl.load(w_base + ks[:, None] * swk + ns[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.sum(xv[:, None] * wt.to(tl.float32), axis=0)
    out = y_ptr + row * sym + (out_offset + ns) * syn
    if ACCUMULATE:
        acc += tl.load(out, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def _longest(seg_start: torch.Tensor, seg_end: torch.Tensor, max_len: int | None) -> int:
    if max_len is not None:
        return max_len
    # Reads the device: only for callers without host-side segments (tests, one-off uses).
    return int((seg_end - seg_start).max().item()) if seg_start.numel() else 0


def sgmv_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    seg_start: torch.Tensor,
    seg_end: torch.Tensor,
    seg_slot: torch.Tensor,
    max_len: int | None = None,
) -> torch.Tensor:
    """[tokens, R]: x[s:e] · a_stack[slot] for each segment; zeros for tokens outside the segments.
    `max_len`: the longest segment (read from the device when not given)."""
    tokens, k = x.shape
    r = a_stack.shape[2]
    out = x.new_zeros(tokens, r)
    longest = _longest(seg_start, seg_end, max_len)
    if longest == 0 or r == 0:
        return out
    block_m, block_r = _tile(longest, 64), _tile(r, 64)
    grid = (seg_start.shape[0], triton.cdiv(longest, block_m), triton.cdiv(r, block_r))
    _sgmv_kernel[grid](
        x, a_stack, out, seg_start, seg_end, seg_slot,
        k, r, 0, *x.stride(), *a_stack.stride(), *out.stride(),
        ACCUMULATE=False, BLOCK_M=block_m, BLOCK_K=_tile(k, 64), BLOCK_N=block_r,
    )  # fmt: skip
    return out


def sgmv_expand(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    b_stack: torch.Tensor,
    seg_start: torch.Tensor,
    seg_end: torch.Tensor,
    seg_slot: torch.Tensor,
    out_offset: int = 0,
    max_len: int | None = None,
) -> None:
    """y[s:e, out_offset : out_offset + out_size] += shrunk[s:e] · b_stack[slot] for each segment, in
    place (out_size = b_stack.shape[2]; shrunk [tokens, r] is usually a column view of the shrink's
    output)."""
    rank, n = b_stack.shape[1], b_stack.shape[2]
    longest = _longest(seg_start, seg_end, max_len)
    if longest == 0 or rank == 0 or n == 0:
        return
    block_m, block_n = _tile(longest, 64), _tile(n, 64)
    grid = (seg_start.shape[0], triton.cdiv(longest, block_m), triton.cdiv(n, block_n))
    _sgmv_kernel[grid](
        shrunk, b_stack, y, seg_start, seg_end, seg_slot,
        rank, n, out_offset, *shrunk.stride(), *b_stack.stride(), *y.stride(),
        ACCUMULATE=True, BLOCK_M=block_m, BLOCK_K=_tile(rank, 64), BLOCK_N=block_n,
    )  # fmt: skip


def bgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, row_slot: torch.Tensor) -> torch.Tensor:
    """[tokens, R]: x[t] · a_stack[row_slot[t]] for each token; zeros where row_slot is -1."""
    tokens, k = x.shape
    r = a_stack.shape[2]
    out = x.new_zeros(tokens, r)
    if tokens == 0 or r == 0:
        return out
    block_r = _tile(r, 64)
    _bgmv_kernel[(tokens, triton.cdiv(r, block_r))](
        x, a_stack, out, row_slot,
        k, r, 0, *x.stride(), *a_stack.stride(), *out.stride(),
        ACCUMULATE=False, BLOCK_K=_tile(k, 64), BLOCK_N=block_r,
    )  # fmt: skip
    return out


def bgmv_expand(
    y: torch.Tensor, shrunk: torch.Tensor, b_stack: torch.Tensor, row_slot: torch.Tensor, out_offset: int = 0
) -> None:
    """y[t, out_offset : out_offset + out_size] += shrunk[t] · b_stack[row_slot[t]] for each token with
    a slot, in place (out_size = b_stack.shape[2])."""
    tokens = y.shape[0]
    rank, n = b_stack.shape[1], b_stack.shape[2]
    if tokens == 0 or rank == 0 or n == 0:
        return
    block_n = _tile(n, 64)
    _bgmv_kernel[(tokens, triton.cdiv(n, block_n))](
        shrunk, b_stack, y, row_slot,
        rank, n, out_offset, *shrunk.stride(), *b_stack.stride(), *y.stride(),
        ACCUMULATE=True, BLOCK_K=_tile(rank, 64), BLOCK_N=block_n,
    )  # fmt: skip


# The torch functions the kernels replace: the same signatures, plain loops and gathers, float32
# products rounded once to the output's dtype as the kernels do.


def sgmv_shrink_torch(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    seg_start: torch.Tensor,
    seg_end: torch.Tensor,
    seg_slot: torch.Tensor,
    max_len: int | None = None,
) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], a_stack.shape[2])
    for s, e, slot in zip(seg_start.tolist(), seg_end.tolist(), seg_slot.tolist(), strict=True):
        if slot >= 0:
            out[s:e] = (x[s:e].float() @ a_stack[slot].float()).to(out.dtype)
    return out


def sgmv_expand_torch(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    b_stack: torch.Tensor,
    seg_start: torch.Tensor,
    seg_end: torch.Tensor,
    seg_slot: torch.Tensor,
    out_offset: int = 0,
    max_len: int | None = None,
) -> None:
    cols = slice(out_offset, out_offset + b_stack.shape[2])
    for s, e, slot in zip(seg_start.tolist(), seg_end.tolist(), seg_slot.tolist(), strict=True):
        if slot >= 0:
            delta = shrunk[s:e].float() @ b_stack[slot].float()
            y[s:e, cols] = (y[s:e, cols].float() + delta).to(y.dtype)


def bgmv_shrink_torch(x: torch.Tensor, a_stack: torch.Tensor, row_slot: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], a_stack.shape[2])
    rows = (row_slot >= 0).nonzero().squeeze(1)
    a = a_stack[row_slot[rows].long()].float()  # [rows, in, R]: each row's own factors
    out[rows] = torch.bmm(x[rows].float().unsqueeze(1), a).squeeze(1).to(out.dtype)
    return out


def bgmv_expand_torch(
    y: torch.Tensor, shrunk: torch.Tensor, b_stack: torch.Tensor, row_slot: torch.Tensor, out_offset: int = 0
) -> None:
    rows = (row_slot >= 0).nonzero().squeeze(1)
    cols = slice(out_offset, out_offset + b_stack.shape[2])
    b = b_stack[row_slot[rows].long()].float()  # [rows, r, out_size]
    delta = torch.bmm(shrunk[rows].float().unsqueeze(1), b).squeeze(1)
    y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)
