"""Attention through the `flash_attn` package (CUDA, float16/bfloat16): `--attention-backend flash`.

flash-attn reads a paged cache only in pages of 256 tokens or more, so this backend gathers every
sequence's cached keys and values into one packed [total_context, kv_heads, head_dim] tensor (one
`index_select` per layer over row indices built once per forward pass) and calls
`flash_attn_varlen_func` on it. Its semantics match `TorchAttention`: causal attention is aligned to
the end of the context (flash-attn >= 2.1), the window `(window - 1, 0)` keeps keys with
`position - k < window`, and its ALiBi bias `-slope·|position - k|` is `slope·(k - position)` on the
keys a causal query sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..forward import ForwardBatch


@dataclass
class _Packed:
    """Per-forward layout of the packed keys/values."""

    rows: torch.Tensor  # [total_context] int64, cache row (block · block_size + offset) of each context position
    cu_q: torch.Tensor  # [batch + 1] int32, query offsets
    cu_k: torch.Tensor  # [batch + 1] int32, packed context offsets

    @classmethod
    def build(cls, meta: ForwardBatch, block_size: int) -> _Packed:
        device, ctx = meta.context_lens.device, meta.context_lens
        # The host copy when the batch has one; otherwise the one sync of the forward pass.
        total = sum(meta.host_context_lens) if meta.host_context_lens else int(ctx.sum())
        zero = ctx.new_zeros(1)
        cu_k = torch.cat([zero, torch.cumsum(ctx, 0)])
        seq = torch.repeat_interleave(torch.arange(ctx.shape[0], device=device), ctx, output_size=total)
        pos = torch.arange(total, device=device) - cu_k[seq]
        rows = meta.block_tables[seq, pos // block_size].long() * block_size + pos % block_size
        cu_q = torch.cat([meta.query_start, meta.query_start.new_full((1,), meta.input_ids.shape[0])])
        return cls(rows, cu_q.to(torch.int32), cu_k.to(torch.int32))


class FlashAttention:
    """`AttentionBackend` over `flash_attn.flash_attn_varlen_func`."""

    name = "flash"

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def _gather(self, cache: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
        flat = cache.view(-1, cache.shape[2], cache.shape[3])
        if cache.dtype != torch.float8_e4m3fn:
            return flat.index_select(0, rows)
        # Gather the float8 bytes (index_select has no float8 kernel everywhere), then widen.
        picked = flat.view(torch.uint8).index_select(0, rows).view(torch.float8_e4m3fn)
        return picked.to(dtype) * scale

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
        from flash_attn import flash_attn_varlen_func

        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"flash-attn computes in float16 or bfloat16, not {q.dtype}; serve with --dtype float16")
        packed = meta.backend_state.get(self.name)
        if packed is None:
            packed = meta.backend_state[self.name] = _Packed.build(meta, self.block_size)
        k = self._gather(cache_k, packed.rows, q.dtype, k_scale)  # [total_context, kv_heads, head_dim]
        v = self._gather(cache_v, packed.rows, q.dtype, v_scale)
        return flash_attn_varlen_func(
            q,
            k,
            v,
            packed.cu_q,
            packed.cu_k,
            meta.max_query_len,
            meta.max_context_len,
            softmax_scale=scale,
            causal=True,
            window_size=(window - 1, 0) if window is not None else (-1, -1),
            softcap=softcap or 0.0,
            alibi_slopes=alibi_slopes,
        )
