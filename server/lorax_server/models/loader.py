"""Build a `CausalLM` from a local Hugging Face model directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from ..encoders.config import is_encoder_dir
from ..layers.attention import AttentionBackend
from ..layers.packed import pack_dense_weights, packing_applies
from ..layers.parallel import ShardingError
from ..layers.quant import QuantizationError, checkpoint
from ..layers.quant.methods import quantizer
from ..utils.memory import return_freed_memory
from ..utils.weights import Weights
from .config import ModelConfig
from .fallback import TransformersCausalLM, UnsupportedArchitecture
from .registry import REGISTRY
from .transformer import CausalLM

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointDtype(Protocol):
    """What `resolve_dtype` reads of a model's config (a `ModelConfig`, an encoder's config)."""

    @property
    def torch_dtype(self) -> str | None: ...


def resolve_dtype(requested: str | None, config: CheckpointDtype, device: torch.device) -> torch.dtype:
    """`--dtype` wins; otherwise the checkpoint's dtype on GPU and float32 on CPU (half is slow and
    inexact there)."""
    if requested:
        if requested not in DTYPES:
            raise ValueError(f"unsupported dtype {requested!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(config.torch_dtype or "", torch.float16)


def load_model(
    model_dir: str | Path,
    backend: AttentionBackend,
    device: torch.device,
    dtype: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> CausalLM | TransformersCausalLM:
    """Our own implementation when the architecture has a spec, else the transformers fallback.
    `quantize`: a `--quantize` method (`layers.quant`); the fallback cannot be quantized."""
    if is_encoder_dir(model_dir):
        raise UnsupportedArchitecture(
            f"{model_dir} holds an encoder model, which generates no text: load it with "
            "lorax_server.encoders.engine.EncoderEngine.load"
        )
    quantize, stored_format = checkpoint.resolve(quantize, model_dir)
    # Dense modules of a pre-quantized checkpoint stay dense (it left them so on purpose).
    quantize_weight = quantizer(quantize) if stored_format is None else None
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, config, device)
    spec = REGISTRY.get(config.architecture)
    if spec is None:
        if world_size > 1:
            raise ShardingError(
                f"{config.architecture} is served by the transformers fallback, which cannot be sharded; "
                "serve it with --num-shard 1"
            )
        if quantize is not None:
            raise QuantizationError(
                f"--quantize {quantize}: {config.architecture} is served by the transformers fallback, "
                "which cannot be quantized"
            )
        return TransformersCausalLM(Path(model_dir), config, torch_dtype, device, trust_remote_code)
    weights = Weights(
        model_dir, torch_dtype, device, rank, world_size, spec.optional_prefix, quantize_weight, stored_format
    )
    kv_cache_dtype = torch.float8_e4m3fn if quantize == "fp8-kv" else None  # fp8-kv: float8 weights and KV cache
    model = CausalLM(spec, config, weights, backend, device, kv_cache_dtype)
    model.quantize = quantize  # what /info reports, a method detected from the checkpoint included
    if packing_applies(device, torch_dtype):
        packed = pack_dense_weights(model.linears(), keep=[model.embed])  # a tied LM head stays the embedding
        logger.info("%d dense linear weights packed for oneDNN", packed)
    if quantize_weight is not None and device.type == "cpu":
        return_freed_memory()
    return model
