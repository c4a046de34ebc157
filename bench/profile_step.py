"""Where the engine's time goes on the bench workload: the torch operators that take the most time, and
the Python functions (LoRA segments, attention layout, sampling, host work) with their own time, over
the whole workload served in-process (bench/shard_throughput.py's loop). A profile aid, not a test.

    .venv/bin/python bench/profile_step.py [--adapters 8] [--requests 64] [--rows 15]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_throughput import engine_with_adapters  # noqa: E402
from http_server import make_bench_model  # noqa: E402
from shard_throughput import serve_all, workload  # noqa: E402

from lorax_server.batch import RequestIn  # noqa: E402
from lorax_server.sampling import SamplingParams  # noqa: E402


def requests_for(work: list[tuple[list[int], int]], num_adapters: int) -> list[RequestIn]:
    return [
        RequestIn(
            i, ids, SamplingParams(), o, ignore_eos=True, adapter_index=(i % num_adapters) + 1 if num_adapters else 0
        )
        for i, (ids, o) in enumerate(work)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = make_bench_model(Path(tmp), args.adapters)
        engine = engine_with_adapters(model_dir, adapters, 4096)
        work = workload(args.requests, AutoTokenizer.from_pretrained(model_dir).vocab_size)
        serve_all(engine, requests_for(work, args.adapters)[:8], 4096)  # warm the allocator and caches
        python = cProfile.Profile()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            python.enable()
            tokens, seconds = serve_all(engine, requests_for(work, args.adapters), 4096)
            python.disable()
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tok/s under the profilers), "
          f"{args.adapters} adapters, {torch.get_num_threads()} threads\n")  # fmt: skip
    print("torch operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    out = io.StringIO()
    stats = pstats.Stats(python, stream=out).sort_stats("tottime")
    stats.print_stats(args.rows)
    print("Python functions by own time (torch calls they make are inside the C functions' rows):")
    print(out.getvalue().split("\n", 6)[-1])


if __name__ == "__main__":
    main()
