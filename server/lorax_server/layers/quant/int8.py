"""`eetq`: int8 weight-only quantization with one symmetric scale per output channel, from a
full-precision checkpoint at load time. The matmul dequantizes transiently in the activations'
dtype (on CPU this measured faster than torch's packed int8 kernel), so no full-precision copy
stays resident: 1 byte per weight plus 4 per output channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Int8Weight:
    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values = values  # int8 [out, in]
        self.scales = scales  # float32 [out]
        self.out_features, self.in_features = values.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """Round-to-nearest with scale = max |w| / 127 per output channel (rows of zeros get scale 1)."""
        w = weight.detach().float()
        scales = w.abs().amax(dim=1) / 127.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        values = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(values, scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.values.to(x.dtype))
        return y * self.scales.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.values.float() * self.scales[:, None]

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scales.numel() * self.scales.element_size()
