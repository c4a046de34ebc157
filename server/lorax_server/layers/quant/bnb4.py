"""`bitsandbytes-nf4` and `bitsandbytes-fp4`: 4-bit codebook weights quantized at load time, as
bitsandbytes defines them: blocks of 64 consecutive input channels share one float32 absmax, and each
weight stores the index of the codebook value nearest to w / absmax.

Blocks run along each row (bitsandbytes blocks the flattened tensor, which is the same whenever the
input size is a multiple of 64; otherwise a row's last block is partial here). Statistics are kept in
float32 (bitsandbytes' `compress_statistics=False`): 0.5625 bytes per weight.
"""

from __future__ import annotations

import torch

from .grouped import GroupedWeight

BLOCK = 64

# NormalFloat4 (QLoRA): quantiles of a standard normal, normalised to [-1, 1], with an exact zero.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip

# bitsandbytes' FP4: bit 3 is the sign; the low three bits select a magnitude (in sixths of the block's
# absmax: 0, 1/32, 4, 6, 2, 3, 1, 1.5).
_FP4_MAGNITUDES = torch.tensor([0.0, 1 / 32, 4.0, 6.0, 2.0, 3.0, 1.0, 1.5]) / 6
FP4 = torch.cat([_FP4_MAGNITUDES, -_FP4_MAGNITUDES])

CODEBOOKS = {"nf4": NF4, "fp4": FP4}


def quantize_4bit(weight: torch.Tensor, kind: str) -> GroupedWeight:
    """kind: "nf4" or "fp4"."""
    table = CODEBOOKS[kind].to(weight.device)
    w = weight.detach().float()
    out_features, in_features = w.shape
    blocks = -(-in_features // BLOCK)
    padded = torch.nn.functional.pad(w, (0, blocks * BLOCK - in_features)).view(out_features, blocks, BLOCK)
    absmax = padded.abs().amax(dim=2)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalised = (padded / absmax[:, :, None]).view(out_features, -1)[:, :in_features]
    # Nearest codebook value; chunked so the [rows, in, 16] distance tensor stays small.
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    for start in range(0, out_features, 256):
        rows = normalised[start : start + 256]
        codes[start : start + 256] = (rows[..., None] - table).abs().argmin(dim=-1).to(torch.uint8)
    return GroupedWeight.from_codes(codes, 4, table, absmax, None, BLOCK)
