"""Weight formats behind `Linear`: the seam for quantized base models.

A `Linear` holds either a dense tensor or a `WeightFormat`: an object with a matmul and a
`dequantize()` (what tests compare against a `transformers` model loaded with the dequantized
weights). Specs, LoRA and the loaders never look inside a format: `methods.quantizer(method)` turns the
`--quantize` value into the function that quantizes a dense [out, in] weight at load time, and
`checkpoint.resolve` finds the reader of a pre-quantized checkpoint.
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


def missing_tensor(method: str, prefix: str) -> str:
    """The error for a module a pre-quantized checkpoint should store quantized but does not."""
    tensors = "qweight, qzeros, scales and g_idx" if method == "gptq" else "qweight, qzeros and scales"
    return (
        f"--quantize {method} expects a checkpoint quantized with {method.upper()} ({tensors} per linear "
        f"module), but tensor '{prefix}.qweight' is missing; to quantize a full-precision checkpoint "
        "while loading it, use a load-time method such as --quantize bitsandbytes-nf4"
    )


def stored_shape(
    method: str,
    weights_has: Callable[[str], bool],
    prefix: str,
    shape: tuple[int, int] | None,
    required: bool,
    dense_modules: tuple[str, ...],
) -> tuple[int, int] | None:
    """A pre-quantized reader's first step: the module's [out, in] when the checkpoint stores it
    quantized (`prefix.qweight`), None when it is stored dense; a module that should be quantized but
    is not (`required`, not in `dense_modules`) is an error naming the missing tensor."""
    if not weights_has(f"{prefix}.qweight"):
        if required and not any(prefix.endswith(m) for m in dense_modules):
            raise QuantizationError(missing_tensor(method, prefix))
        return None
    if shape is None:
        raise QuantizationError(f"{prefix}: a pre-quantized module needs its expected shape")
    return shape


Quantizer = Callable[[torch.Tensor], WeightFormat]

# Methods that need a checkpoint already quantized in their format.
PRE_QUANTIZED = ("gptq", "awq")
