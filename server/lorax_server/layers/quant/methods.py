"""`--quantize` methods that quantize a full-precision checkpoint while it loads."""

from __future__ import annotations

from . import METHODS, PRE_QUANTIZED, QuantizationError, Quantizer
from .bnb4 import quantize_4bit
from .fp8 import quantize_fp8
from .hqq import quantize_hqq
from .int8 import quantize_bnb_int8, quantize_eetq

ON_LOAD: dict[str, Quantizer] = {
    "eetq": quantize_eetq,
    "bitsandbytes": quantize_bnb_int8,
    "bitsandbytes-nf4": lambda w: quantize_4bit(w, "nf4"),
    "bitsandbytes-fp4": lambda w: quantize_4bit(w, "fp4"),
    "fp8": quantize_fp8,
    "fp8-kv": quantize_fp8,  # and a float8 KV cache (models.loader)
    "hqq-4bit": lambda w: quantize_hqq(w, 4),
    "hqq-3bit": lambda w: quantize_hqq(w, 3),
    "hqq-2bit": lambda w: quantize_hqq(w, 2),
}


def quantizer(method: str | None) -> Quantizer | None:
    """The load-time quantizer of `method`; None for a dense model or a pre-quantized method."""
    if method is None or method in PRE_QUANTIZED:
        return None
    if method in ON_LOAD:
        return ON_LOAD[method]
    if method == "exl2":
        raise QuantizationError(
            "--quantize exl2 needs ExLlamaV2's CUDA kernels, which this build does not have; serve a GPTQ "
            "or AWQ checkpoint, or quantize a full-precision checkpoint on load (for example --quantize "
            "bitsandbytes-nf4 or hqq-4bit)"
        )
    raise QuantizationError(f"unknown --quantize {method!r}; LoRAX's methods are {', '.join(METHODS)}")
