"""Weight formats behind `Linear`: the seam for quantized base models.

A `Linear` holds either a dense tensor or a `WeightFormat`: an object with a matmul and a
`dequantize()` (what tests compare against a `transformers` model loaded with the dequantized
weights). Specs, LoRA and the loaders never look inside a format; `quantizer(method)` turns the
`--quantize` value into the function that quantizes a dense [out, in] weight at load time.
Embeddings, norms, the LM head and MoE routers stay dense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

# Every `--quantize` value LoRAX accepts (the launcher's list is the same).
METHODS = (
    "bitsandbytes",
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "gptq",
    "awq",
    "eetq",
    "exl2",
    "fp8",
    "fp8-kv",
    "hqq-4bit",
    "hqq-3bit",
    "hqq-2bit",
)


class QuantizationError(ValueError):
    """A `--quantize` value this build cannot serve; the message says why."""


class WeightFormat(Protocol):
    """A quantized [out_features, in_features] weight."""

    in_features: int
    out_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, in_features] → [num_tokens, out_features] in x's dtype (no bias)."""
        ...

    def dequantize(self) -> torch.Tensor:
        """The weight the matmul computes with, as float32 [out_features, in_features]."""
        ...

    def nbytes(self) -> int:
        """Bytes the format keeps resident (values, scales and zeros)."""
        ...


Quantizer = Callable[[torch.Tensor], WeightFormat]


def quantizer(method: str | None) -> Quantizer | None:
    """The load-time quantizer of `method`; None for a dense model."""
    if method is None:
        return None
    from .int8 import Int8Weight

    on_load: dict[str, Quantizer] = {"eetq": Int8Weight.quantize}
    if method in on_load:
        return on_load[method]
    if method in METHODS:
        raise QuantizationError(
            f"--quantize {method} is not supported yet (supported: {', '.join(on_load)}); "
            "start without --quantize or with a supported method"
        )
    raise QuantizationError(f"unknown --quantize {method!r}; LoRAX's methods are {', '.join(METHODS)}")
