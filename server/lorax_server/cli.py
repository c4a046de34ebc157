"""`lorax-server serve MODEL_ID --uds-path PATH` and `lorax-server download-weights MODEL_ID`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layers.attention import AttentionBackend


@dataclass(frozen=True)
class ShardConfig:
    """Everything `serve` needs, read once from the command line and the torch.distributed env."""

    model_id: str
    uds_path: str
    revision: str | None
    dtype: str | None
    sharded: bool
    rank: int
    world_size: int
    block_size: int
    memory_fraction: float | None
    kv_cache_blocks: int | None
    adapter_memory_fraction: float
    trust_remote_code: bool
    otlp_endpoint: str | None = None
    quantize: str | None = None
    prefix_caching: bool = False
    chunked_prefill: bool = False
    attention_backend: str | None = None  # None: the best available on the device
    compile: bool = False  # replay decode steps from CUDA graphs
    speculative_tokens: int = 0
    speculation_max_batch_size: int = 32
    default_adapter_id: str | None = None
    default_adapter_source: str = "hub"
    merge_adapter_weights: bool = False  # fold the default adapter into the base weights: no dynamic adapters
    compile_max_batch_size: int = 128  # larger decode batches run without CUDA graphs
    # From the launcher's environment (LoRAX passes these as variables):
    disable_custom_kernels: bool = False  # DISABLE_CUSTOM_KERNELS: torch's kernels only
    disable_sgmv: bool = False  # DISABLE_SGMV: LoRA by the reference plans, no batched LoRA kernel
    memory_wiggle_room: float = 1.0  # MEMORY_WIGGLE_ROOM: share of the GPU's free memory the KV cache takes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorax-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="load a model and serve it over gRPC on a unix socket")
    serve.add_argument("model_id", help="local model directory or Hugging Face Hub id")
    serve.add_argument("--uds-path", default="/tmp/lorax-server", help="socket path prefix; rank r uses PATH-r")
    serve.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    serve.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    serve.add_argument("--sharded", action="store_true", help="tensor-parallel over WORLD_SIZE ranks")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    serve.add_argument(
        "--memory-fraction",
        type=float,
        default=None,
        help="GPU: share of the device's memory this shard may use (default 1; the KV cache takes what the "
        "model, the largest prefill and the adapters leave); CPU: share of available RAM for the KV cache "
        "(default 0.05)",
    )
    serve.add_argument("--kv-cache-blocks", type=int, default=None, help="explicit KV cache size in blocks")
    serve.add_argument(
        "--adapter-memory-fraction",
        type=float,
        default=float(os.environ.get("ADAPTER_MEMORY_FRACTION", "0.1")),
        help="share of GPU memory (available RAM on CPU) reserved for loaded adapters; env ADAPTER_MEMORY_FRACTION",
    )
    serve.add_argument("--trust-remote-code", action="store_true")
    serve.add_argument(
        "--quantize",
        default=os.environ.get("QUANTIZE") or None,
        help="quantize the base model's linear weights (adapters keep their precision); see docs/quantization.md",
    )
    serve.add_argument(
        "--prefix-caching",
        action="store_true",
        help="reuse the KV cache blocks of prompt prefixes seen before (same adapter) instead of computing them",
    )
    serve.add_argument(
        "--chunked-prefill",
        action="store_true",
        help="compute at most the router's prefill budget of prompt tokens per step; longer prompts take several",
    )
    serve.add_argument("--compile", action="store_true", help="replay decode steps from CUDA graphs (triton backend)")
    serve.add_argument(
        "--attention-backend",
        choices=["torch", "triton", "flash"],
        default=os.environ.get("ATTENTION_BACKEND") or None,
        help="attention kernels; default: triton on CUDA when it imports, else torch; env ATTENTION_BACKEND",
    )
    _add_decode_arguments(serve)
    _add_adapter_arguments(serve)
    serve.add_argument(
        "--otlp-endpoint",
        default=os.environ.get("OTLP_ENDPOINT"),
        help="OpenTelemetry collector (OTLP/gRPC, e.g. http://collector:4317) for the shard's spans",
    )
    serve.add_argument("--log-level", default="INFO")

    download = sub.add_parser("download-weights", help="fetch a model; prints its local directory last")
    download.add_argument("model_id")
    download.add_argument("--revision", default=None)
    download.add_argument("--log-level", default="INFO")
    return parser


def _add_adapter_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--default-adapter-id",
        default=None,
        help="the server's default adapter (the launcher's --adapter-id): its Medusa heads draft for every request",
    )
    serve.add_argument("--default-adapter-source", default="hub", help="where --default-adapter-id comes from")
    serve.add_argument(
        "--merge-adapter-weights",
        action="store_true",
        help="add --default-adapter-id's LoRA update to the base weights at start; no adapter is loaded after",
    )


def _add_decode_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--compile-max-batch-size",
        type=int,
        default=128,
        help="with --compile, decode batches of more requests than this run without CUDA graphs",
    )
    serve.add_argument(
        "--speculative-tokens",
        type=int,
        default=0,
        help="draft up to N tokens per row and step by prompt lookup and keep those sampling agrees with (0: off)",
    )
    serve.add_argument(
        "--speculation-max-batch-size",
        type=int,
        default=int(os.environ.get("SPECULATION_MAX_BATCH_SIZE", "32")),
        help="decode steps over more rows draft nothing; env SPECULATION_MAX_BATCH_SIZE",
    )


def _shard_config(args: argparse.Namespace) -> ShardConfig:
    from . import watermark

    try:
        watermark.settings()  # WATERMARK_GAMMA, WATERMARK_DELTA: checked now rather than at a first request
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not args.sharded and world_size != 1:
        raise SystemExit("WORLD_SIZE > 1 needs --sharded")
    return ShardConfig(
        model_id=args.model_id,
        uds_path=args.uds_path,
        revision=args.revision,
        dtype=args.dtype,
        sharded=args.sharded,
        rank=rank,
        world_size=world_size,
        block_size=args.block_size,
        memory_fraction=args.memory_fraction,
        kv_cache_blocks=args.kv_cache_blocks,
        adapter_memory_fraction=args.adapter_memory_fraction,
        trust_remote_code=args.trust_remote_code,
        otlp_endpoint=args.otlp_endpoint,
        quantize=args.quantize,
        prefix_caching=args.prefix_caching,
        chunked_prefill=args.chunked_prefill,
        attention_backend=args.attention_backend,
        compile=args.compile,
        speculative_tokens=args.speculative_tokens,
        speculation_max_batch_size=args.speculation_max_batch_size,
        default_adapter_id=args.default_adapter_id,
        default_adapter_source=args.default_adapter_source,
        merge_adapter_weights=args.merge_adapter_weights,
        compile_max_batch_size=args.compile_max_batch_size,
        disable_custom_kernels=_env_flag("DISABLE_CUSTOM_KERNELS"),
        disable_sgmv=_env_flag("DISABLE_SGMV"),
        memory_wiggle_room=_env_fraction("MEMORY_WIGGLE_ROOM"),
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_fraction(name: str) -> float:
    """A fraction in (0, 1] from the environment; 1 when unset. SystemExit when it is not one."""
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else 1.0
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise SystemExit(f"error: {name} must be a number in (0, 1] (got {text!r})")
    return value


def choose_kernels(cfg: ShardConfig, device: torch.device) -> AttentionBackend:
    """The attention backend, and the LoRA kernels that go with it (Triton's with Triton attention);
    SystemExit with the reason when the backend cannot run here."""
    from .adapters import lora
    from .layers.attention import BackendUnavailable, select_backend

    name = cfg.attention_backend
    if cfg.disable_custom_kernels:
        if name not in (None, "torch"):
            raise SystemExit(f"error: DISABLE_CUSTOM_KERNELS leaves only torch's kernels, not attention backend {name}")
        name = "torch"
        os.environ["LORAX_CPU_KERNELS"] = "0"  # the C++ CPU kernels: read where each is used
    try:
        backend = select_backend(device, cfg.block_size, name)
    except (BackendUnavailable, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    if cfg.disable_sgmv:
        lora.set_kernels("reference")
    else:
        lora.set_kernels("triton" if backend.name == "triton" else "torch")
    return backend


def run_serve(cfg: ShardConfig) -> None:
    device = torch.device(f"cuda:{cfg.rank}" if torch.cuda.is_available() else "cpu")
    backend = choose_kernels(cfg, device)  # first of all: a backend that cannot run here fails before any download

    from transformers import AutoTokenizer

    from .adapters.manager import AdapterManager, device_budget
    from .adapters.sources import AdapterSource, fetch_adapter
    from .encoders.config import is_encoder_dir
    from .engine import CacheConfig, Engine
    from .layers.parallel import init_process_group
    from .models.loader import load_model
    from .server import serve
    from .speculation import SpeculationConfig
    from .utils import telemetry
    from .utils.hub import download_weights
    from .utils.memory import keep_freed_memory

    telemetry.setup(cfg.otlp_endpoint, cfg.rank)
    if device.type == "cpu" and keep_freed_memory():
        logging.getLogger(__name__).info("glibc keeps the memory a step frees for the next one")
    model_dir = download_weights(cfg.model_id, cfg.revision)
    if is_encoder_dir(model_dir):
        try:
            _serve_encoder(cfg, model_dir, device)
        finally:
            telemetry.shutdown()
        return
    if cfg.world_size > 1:
        init_process_group(cfg.rank, cfg.world_size, device)
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # The ranks share the machine's cores: each takes its share instead of all of them.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // cfg.world_size))
    model = load_model(
        model_dir, backend, device, cfg.dtype, cfg.rank, cfg.world_size, cfg.trust_remote_code, cfg.quantize
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    adapters = None
    if cfg.merge_adapter_weights:
        _merge_default_adapter(cfg, model, fetch_adapter)
    elif model.supports_adapters:
        adapters = AdapterManager(model, fetch_adapter, device_budget(device, cfg.adapter_memory_fraction))
        if cfg.default_adapter_id:
            adapters.default_adapter = (cfg.default_adapter_id, AdapterSource.parse(cfg.default_adapter_source))
    cache = CacheConfig(
        cfg.block_size, cfg.memory_fraction, cfg.kv_cache_blocks, cfg.prefix_caching, cfg.memory_wiggle_room
    )
    if cfg.speculative_tokens < 0 or cfg.speculation_max_batch_size < 0:
        raise SystemExit("--speculative-tokens and --speculation-max-batch-size must not be negative")
    speculation = SpeculationConfig(cfg.speculative_tokens, cfg.speculation_max_batch_size)
    engine = Engine(
        model,
        tokenizer,
        cache,
        adapters,
        cfg.chunked_prefill,
        speculation=speculation,
        cuda_graphs=cfg.compile,
        cuda_graph_max_batch=cfg.compile_max_batch_size,
    )
    try:
        asyncio.run(serve(engine, model.config.architecture, cfg.uds_path, cfg.rank, cfg.world_size))
    finally:
        telemetry.shutdown()


def _encoder_refusals(cfg: ShardConfig) -> list[str]:
    """The options an encoder model cannot be served with, each with the reason."""
    refused = []
    if cfg.world_size > 1:
        refused.append("it cannot be sharded (serve it with --num-shard 1)")
    if cfg.quantize:
        refused.append(f"--quantize {cfg.quantize}: it is served unquantized")
    if cfg.merge_adapter_weights:
        refused.append("--merge-adapter-weights: it takes no adapters")
    elif cfg.default_adapter_id:
        refused.append("--default-adapter-id (the launcher's --adapter-id): it takes no adapters")
    if cfg.speculative_tokens > 0:
        refused.append("--speculative-tokens: it generates no tokens")
    return refused


def _serve_encoder(cfg: ShardConfig, model_dir: Path, device: torch.device) -> None:
    """Serve an encoder (BERT family) for Embed and Classify; SystemExit with the reason when it cannot be."""
    from .encoders.config import EncoderConfig
    from .encoders.engine import EncoderEngine
    from .server import serve
    from .utils.weights import WeightsError

    log = logging.getLogger(__name__)
    try:
        architecture = EncoderConfig.from_dir(model_dir).architecture
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    refused = _encoder_refusals(cfg)
    if refused:
        what = "; ".join(refused)
        raise SystemExit(f"error: {architecture} is an encoder model (embeddings/classification): {what}")
    ignored = [flag for flag, on in _generation_flags(cfg) if on]
    if ignored:
        log.info("not used by encoder models, ignored: %s", ", ".join(ignored))
    try:
        engine = EncoderEngine.load(model_dir, device, cfg.dtype)
    except (ValueError, WeightsError) as e:
        raise SystemExit(f"error: cannot serve {architecture}: {e}") from e
    log.info("serving %s for embeddings (%d values)%s", architecture, engine.embedding_dim,
             " and token classification" if engine.supports_classification else "")  # fmt: skip
    asyncio.run(serve(engine, architecture, cfg.uds_path, cfg.rank, cfg.world_size))


def _generation_flags(cfg: ShardConfig) -> list[tuple[str, bool]]:
    """Options of generating models that an encoder leaves unused, and whether each is set."""
    return [
        ("--prefix-caching", cfg.prefix_caching),
        ("--chunked-prefill", cfg.chunked_prefill),
        ("--compile", cfg.compile),
        ("--kv-cache-blocks", cfg.kv_cache_blocks is not None),
    ]


def _merge_default_adapter(cfg: ShardConfig, model, fetch) -> None:  # noqa: ANN001 - a CausalLM, fetch_adapter
    """`--merge-adapter-weights`: the default adapter's update joins the base weights; SystemExit with
    the reason when it cannot."""
    from .adapters.loader import AdapterLoadError
    from .adapters.merge_into_base import merge_into_base
    from .adapters.sources import AdapterFetchError

    if not cfg.default_adapter_id:
        raise SystemExit("error: --merge-adapter-weights needs the adapter to merge (--default-adapter-id)")
    if not model.supports_adapters:
        raise SystemExit(f"error: --merge-adapter-weights: {model.config.architecture} takes no LoRA adapters")
    try:
        merged = merge_into_base(model, fetch(cfg.default_adapter_id, cfg.default_adapter_source))
    except (AdapterFetchError, AdapterLoadError) as e:
        raise SystemExit(f"error: --merge-adapter-weights: cannot merge {cfg.default_adapter_id}: {e}") from e
    logging.getLogger(__name__).info(
        "merged %s into the base weights (%d modules): dynamic adapters are off", cfg.default_adapter_id, merged
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "download-weights":
        from .utils.hub import WeightsDownloadError, download_weights

        try:
            path = download_weights(args.model_id, args.revision)
        except WeightsDownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from e
        print(path)
        return
    try:
        run_serve(_shard_config(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
