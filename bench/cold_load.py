"""Cold adapter load through the launcher over HTTP: the time to first token a rank-16 adapter read from
local disk adds to its first request, and the inter-token latency of the requests already running while
it loads, in one run.

Workload (issue 12): the 26M bench model (bench/http_server.py). 8 base-model requests stream (short
prompts, 1,200 new tokens, EOS ignored, so that they outlast the loads on a fast machine too); once
each has 100 tokens, a request for an adapter never loaded before arrives (16-token prompt, 4 new
tokens), then the same request again (the adapter now loaded); so for 4 adapters in turn per server.
Reported: the added time to first token (cold minus warm) and the running requests' p99 gap between
tokens while the adapter loaded against before it. A gap counts as during the load when it ends between
the cold request's arrival and its first token. The gap that holds the cold request's own prefill step
ends after its first token: a warm request's prefill makes the same gap, so it is reported apart (gaps
ending within 0.2 s after a first token, cold or warm).
With `--running-adapters N` the running requests use N adapters (loaded before them) instead of the
base model: then the new adapter also joins a batch of adapters, whose kept LoRA stacks take it in.
With `--adapter-dtype bfloat16` the adapters' files are 16-bit (half the bytes to read and install).
Not a test.

    .venv/bin/python bench/cold_load.py [--repeats 2] [--running-adapters 8] [--adapter-dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from adapter_throughput import ADAPTER_DTYPES
from http_server import make_bench_model, percentile, serve, start_streams, stream, text_of_length
from transformers import AutoTokenizer

RUNNING, RUNNING_NEW, ADAPTERS_PER_RUN = 8, 1200, 4
STEADY_TOKENS = 100  # tokens each running request has before the first adapter is asked for
# A waiting request joins at the next step (`--waiting-served-ratio 0`): otherwise both the cold and the
# warm request wait up to `--max-waiting-tokens` steps for the admission policy, which hides the load.
LIMITS = ["--max-input-length", "256", "--max-total-tokens", "1280", "--kv-cache-blocks", "1024",
          "--waiting-served-ratio", "0"]  # fmt: skip


Gaps = dict[str, list[float]]
AFTER_FIRST_TOKEN = 0.2  # seconds: the running requests' gap that holds a prefill step ends within it


def run(url: str, short: list[str], adapters: list[Path], running: list[Path]) -> tuple[Gaps, list[float]]:
    """(running requests' gaps: steady, during a load, around a cold and a warm prefill; cold minus
    warm time to first token per adapter). The running requests use the adapters `running` in turn
    (loaded first), or the base model."""
    stream(url, "warm up", max_new_tokens=4)
    own = [
        dict(adapter_id=str(running[i % len(running)]), adapter_source="local") if running else {}
        for i in range(RUNNING)
    ]
    for params in own[: len(running)]:
        stream(url, "warm up", max_new_tokens=4, **params)
    loads, cold_prefills, warm_prefills, added = [], [], [], []
    with ThreadPoolExecutor(RUNNING) as pool:
        futures = start_streams(pool, url, short, STEADY_TOKENS, own, max_new_tokens=RUNNING_NEW, ignore_eos_token=True)
        for adapter in adapters:
            params = dict(max_new_tokens=4, adapter_id=str(adapter), adapter_source="local")
            cold = stream(url, short[0], **params)
            warm = stream(url, short[0], **params)
            loads.append((cold.sent, cold.token_times[0]))
            cold_prefills.append((cold.token_times[0], cold.token_times[0] + AFTER_FIRST_TOKEN))
            warm_prefills.append((warm.token_times[0], warm.token_times[0] + AFTER_FIRST_TOKEN))
            added.append(cold.ttft - warm.ttft)
            time.sleep(0.5)
        answers = [f.result() for f in futures]
    if min(a.token_times[-1] for a in answers) < warm_prefills[-1][1]:
        raise RuntimeError("a running request finished before the last load: raise RUNNING_NEW")
    first_load = loads[0][0]
    gaps: Gaps = {"steady": [], "load": [], "cold prefill": [], "warm prefill": []}
    windows = {"load": loads, "cold prefill": cold_prefills, "warm prefill": warm_prefills}
    for a in answers:
        for t0, t1 in zip(a.token_times[1:], a.token_times[2:], strict=False):
            if t1 <= first_load:
                gaps["steady"].append(t1 - t0)
            for name, spans in windows.items():
                if any(start < t1 <= end for start, end in spans):
                    gaps[name].append(t1 - t0)
    return gaps, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--running-adapters", type=int, default=0, help="adapters of the running requests (0: none)")
    parser.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default="float32", help="the adapter files' dtype")
    args = parser.parse_args()
    gaps: Gaps = {}
    added = []
    with tempfile.TemporaryDirectory() as tmp:
        count = ADAPTERS_PER_RUN * args.repeats + args.running_adapters
        model, adapters = make_bench_model(Path(tmp), count, stored_dtype=getattr(torch, args.adapter_dtype))
        running = adapters[ADAPTERS_PER_RUN * args.repeats :]
        tok = AutoTokenizer.from_pretrained(model)
        short = [text_of_length(tok, 16, seed=i + 1) for i in range(RUNNING)]
        for r in range(args.repeats):  # a fresh server each time: its adapters are cold
            with serve(model, *LIMITS, log_dir=Path(tmp)) as url:
                g, a = run(url, short, adapters[r * ADAPTERS_PER_RUN : (r + 1) * ADAPTERS_PER_RUN], running)
            for name, values in g.items():
                gaps.setdefault(name, []).extend(values)
            added += a
    steady = percentile(gaps["steady"], 0.99)
    print("| measure | value |")
    print("|---|---:|")
    print(f"| added time to first token, cold rank-16 adapter (mean of {len(added)}) | "
          f"{statistics.mean(added) * 1000:.0f} ms |")  # fmt: skip
    print(f"| running requests' ITL p99, steady ({len(gaps['steady'])} gaps) | {steady * 1000:.0f} ms |")
    for name in ("load", "cold prefill", "warm prefill"):
        p99 = percentile(gaps[name], 0.99)
        shown = f"{p99 * 1000:.0f} ms, {p99 / steady:.2f}× steady"
        print(f"| running requests' ITL p99, during the {name} ({len(gaps[name])} gaps) | {shown} |")


if __name__ == "__main__":
    main()
