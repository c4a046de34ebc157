"""Throughput with 8 distinct LoRA adapters vs none, and vs transformers + peft, in one run.

DESIGN.md's workload: a random Llama (hidden 512, 8 layers), 8 rank-16 adapters on all linear layers,
N requests with prompts of 16-128 and outputs of 16-128 tokens, greedy, float32.
- ours, no adapters / ours, 8 adapters: the engine with continuous batching (requests assigned to
  adapters round-robin), as in bench/shard_throughput.py;
- with `--adapter-dtypes float32 bfloat16`, the same adapters' files also in 16 bits (the server keeps
  them so on the float32 model), a row each;
- `--rounds N`: every row of ours N times, in turns, a fresh engine each time; the best of each;
- transformers + peft: static left-padded batches, each row with its own adapter (`adapter_names`).
Prints a table of generated tokens/s and ratios; not a test.

    .venv/bin/python bench/adapter_throughput.py [--requests 64] [--adapters 8] [--baseline-batch 16]
        [--adapter-dtypes float32] [--rounds 1] [--skip-peft]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server" / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_throughput import MODEL, generate_in_static_batches, serve_all, workload  # noqa: E402
from tiny_models import make_llama, make_lora_adapter  # noqa: E402

from lorax_server.adapters.manager import AdapterManager, AdapterRequest  # noqa: E402
from lorax_server.batch import RequestIn  # noqa: E402
from lorax_server.engine import CacheConfig, Engine  # noqa: E402
from lorax_server.layers.attention import TorchAttention  # noqa: E402
from lorax_server.models.loader import load_model  # noqa: E402
from lorax_server.sampling import SamplingParams  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_DTYPES = ["float32", "bfloat16", "float16"]  # the benches' choices for the adapter files


def engine_with_adapters(model_dir: Path, adapters: list[Path], prefill_budget: int) -> Engine:
    """The engine on the bench model, warmed up, with `adapters` installed at indices 1, 2, ..."""
    model = load_model(model_dir, TorchAttention(16), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**31)
    for i, path in enumerate(adapters, start=1):
        req = AdapterRequest(ids=(str(path),), source="local")
        manager.install(i, req, manager.prepare(req))
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), CacheConfig(16, num_blocks=2048), manager)
    engine.warmup(256, prefill_budget, 512)
    return engine


def run_ours(model_dir: Path, adapters: list[Path], work, use_adapters: bool, prefill_budget: int):
    engine = engine_with_adapters(model_dir, adapters, prefill_budget)
    pending = [
        RequestIn(
            id=i,
            input_ids=ids,
            sampling=SamplingParams(),
            max_new_tokens=o,
            ignore_eos=True,
            adapter_index=(i % len(adapters)) + 1 if use_adapters else 0,
        )
        for i, (ids, o) in enumerate(work)
    ]
    return serve_all(engine, pending, prefill_budget)


@torch.no_grad()
def run_peft(model_dir: Path, adapters: list[Path], work, batch_size: int):
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapters[0], adapter_name="a0"
    )
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    return generate_in_static_batches(model, work, batch_size, lambda i: f"a{i % len(adapters)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--baseline-batch", type=int, default=16)
    parser.add_argument("--prefill-budget", type=int, default=4096)
    parser.add_argument("--skip-peft", action="store_true", help="only compare ours with and without adapters")
    parser.add_argument("--adapter-dtypes", nargs="+", choices=ADAPTER_DTYPES, default=["float32"])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_llama(Path(tmp) / "base", **MODEL)
        lora = dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR)
        files = {  # the same adapters (same seeds), their files in each dtype
            dtype: [
                make_lora_adapter(model_dir, Path(tmp) / dtype / f"a{i}", i, stored_dtype=getattr(torch, dtype), **lora)
                for i in range(args.adapters)
            ]
            for dtype in args.adapter_dtypes
        }
        adapters = files[args.adapter_dtypes[0]]
        work = workload(args.requests, AutoTokenizer.from_pretrained(model_dir).vocab_size)
        rows = []
        if not args.skip_peft:
            rows.append((f"transformers + peft, static batches of {args.baseline_batch}",
                         *run_peft(model_dir, adapters, work, args.baseline_batch)))  # fmt: skip
        ours = {"lorax_server, no adapters": (adapters, False)}
        for dtype, paths in files.items():
            suffix = "" if args.adapter_dtypes == ["float32"] else f", {dtype} files"
            ours[f"lorax_server, {args.adapters} adapters{suffix}"] = (paths, True)
        best: dict[str, tuple[int, float]] = {}
        for _ in range(args.rounds):
            for name, (paths, use) in ours.items():
                tokens, seconds = run_ours(model_dir, paths, work, use, args.prefill_budget)
                if name not in best or seconds < best[name][1]:
                    best[name] = (tokens, seconds)
        rows += [(name, *best[name]) for name in ours]
    base_tps = rows[0][1] / rows[0][2]
    print(f"| {'system':<44} | {'tokens':>7} | {'seconds':>8} | {'tokens/s':>9} | {'vs first row':>12} |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 14}|")
    for name, tokens, seconds in rows:
        tps = tokens / seconds
        print(f"| {name:<44} | {tokens:>7} | {seconds:>8.2f} | {tps:>9.1f} | {tps / base_tps:>12.2f} |")
    print(
        f"\n{args.requests} requests, prompts 16-128, outputs 16-128, greedy, float32, rank-16 adapters on all "
        f"linear layers, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
