"""Which quantization a checkpoint already has, and how that meets `--quantize`.

A checkpoint declares it in config.json's `quantization_config` (or AutoGPTQ's quantize_config.json).
Served without `--quantize`, a pre-quantized checkpoint is detected, logged and served in its format,
as LoRAX does; a `--quantize` that contradicts it is an error, not a silent reinterpretation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from . import PRE_QUANTIZED, QuantizationError
from .awq import AwqCheckpoint
from .fp8 import Fp8Checkpoint
from .gptq import BITS, GptqCheckpoint

logger = logging.getLogger(__name__)

# quantization_config's quant_method → the `--quantize` method that serves it
STORED_METHODS = {"gptq": "gptq", "awq": "awq", "fp8": "fp8", "compressed-tensors": "fp8"}


def stored_quantization(model_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint's quantization_config, or None for a full-precision checkpoint."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text()).get("quantization_config")
        if config:
            return config
    legacy = model_dir / "quantize_config.json"  # AutoGPTQ writes GPTQ's settings here
    if legacy.exists():
        return {"quant_method": "gptq", **json.loads(legacy.read_text())}
    return None


def resolve(requested: str | None, model_dir: str | Path) -> tuple[str | None, Any]:
    """(the method to serve, the pre-quantized checkpoint reader or None)."""
    config = stored_quantization(model_dir)
    if config is None:
        return requested, reader(requested, {}) if requested in PRE_QUANTIZED else None
    stored = str(config.get("quant_method", ""))
    method = STORED_METHODS.get(stored)
    if method is None:
        raise QuantizationError(
            f"the checkpoint is quantized with {stored!r}, which this server cannot read (it reads "
            f"{', '.join(STORED_METHODS)}); serve a full-precision checkpoint, quantized while loading"
        )
    if requested is None:
        logger.info("the checkpoint is pre-quantized with %s: serving it with --quantize %s", stored, method)
        requested = method
    elif requested != method and not (method == "fp8" and requested == "fp8-kv"):
        raise QuantizationError(
            f"--quantize {requested} contradicts the checkpoint, whose quantization_config says quant_method "
            f"{stored!r}: start with --quantize {method} (or without --quantize)"
        )
    return requested, reader(method, config)


def reader(method: str, config: dict[str, Any]) -> GptqCheckpoint | AwqCheckpoint | Fp8Checkpoint:
    dense = tuple(config.get("modules_to_not_convert") or ())
    if method == "fp8":
        block = config.get("weight_block_size")
        return Fp8Checkpoint(tuple(block) if block else None)
    bits, group_size = config.get("bits"), config.get("group_size")
    if group_size is not None and (not isinstance(group_size, int) or (group_size < 1 and group_size != -1)):
        raise QuantizationError(f"{method} group_size {group_size!r} is not supported (a positive size, or -1)")
    if method == "awq":
        version = str(config.get("version", "gemm")).lower()
        if bits not in (None, 4) or version != "gemm" or config.get("zero_point") is False:
            raise QuantizationError(
                f"AWQ {bits}-bit {version} (zero_point {config.get('zero_point', True)}) is not supported: "
                "only 4-bit GEMM checkpoints with zero points"
            )
        return AwqCheckpoint(group_size, dense_modules=dense)
    if bits is not None and bits not in BITS:
        raise QuantizationError(f"GPTQ with {bits} bits is not supported (supported: 2, 3, 4, 8)")
    v1 = config.get("checkpoint_format", "gptq") == "gptq"
    return GptqCheckpoint(bits, group_size, zeros_minus_one=v1, dense_modules=dense)
