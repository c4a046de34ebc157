"""8-bit integer weights, one symmetric scale per output channel, quantized from a full-precision
checkpoint at load time: 1 byte per weight plus 4 per output channel.

- `eetq`: scale = max |w| / 127, code = round(w / scale).
- `bitsandbytes` (LLM.int8's vector-wise weight quantization): code = round(w · 127 / max |w|), value =
  code · max |w| / 127, as `bitsandbytes.functional.int8_vectorwise_quant` defines it. LLM.int8 also
  quantizes the activations and keeps outlier columns in half precision to protect them; here the
  activations stay in full precision, so there is nothing to protect and no threshold.
"""

from __future__ import annotations

import torch

from .grouped import GroupedWeight

SIGNED = torch.arange(256, dtype=torch.float32) - 128  # code c stores the integer c - 128


def _grouped(q: torch.Tensor, scales: torch.Tensor) -> GroupedWeight:
    codes = (q + 128).to(torch.uint8)
    return GroupedWeight.from_codes(codes, 8, SIGNED.to(q.device), scales[:, None], None, q.shape[1])


def _absmax(weight: torch.Tensor) -> torch.Tensor:
    amax = weight.detach().float().abs().amax(dim=1)
    return torch.where(amax > 0, amax, torch.full_like(amax, 127.0))  # rows of zeros: any finite scale


def quantize_eetq(weight: torch.Tensor) -> GroupedWeight:
    scales = _absmax(weight) / 127.0
    q = torch.round(weight.detach().float() / scales[:, None]).clamp_(-127, 127)
    return _grouped(q, scales)


def quantize_bnb_int8(weight: torch.Tensor) -> GroupedWeight:
    absmax = _absmax(weight)
    q = torch.round(weight.detach().float() * (127.0 / absmax[:, None])).clamp_(-127, 127)
    return _grouped(q, absmax * (1.0 / 127.0))
