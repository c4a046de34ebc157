"""Reading integer codes packed into int32 words, as GPTQ and AWQ checkpoints store them: a little-endian
bit stream, value j at bits [j·bits, (j+1)·bits) of the stream (3-bit values straddle words)."""

from __future__ import annotations

import torch


def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """words: int32 [num_words, columns], each column its own stream along dim 0 → int64 [count, columns]."""
    stream = words.to(torch.int64) & 0xFFFFFFFF
    position = torch.arange(count, device=words.device) * bits
    word, shift = position // 32, (position % 32)[:, None]
    low = stream[word] >> shift
    spill = (shift + bits > 32).squeeze(1)  # values that continue into the next word
    high = torch.zeros_like(low)
    if spill.any():
        high[spill] = stream[word[spill] + 1] << (32 - shift[spill])
    return (low | high) & (2**bits - 1)
