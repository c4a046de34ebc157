"""Cold adapter load through the launcher over HTTP: the time to first token a rank-16 adapter read from
local disk adds to its first request, and the inter-token latency of the requests already running while
it loads, in one run.

Workload (issue 12): the 26M bench model (bench/http_server.py). 8 base-model requests stream (short
prompts, 200 new tokens, EOS ignored); once they generate, a request for an adapter never loaded before
arrives (16-token prompt, 4 new tokens), then the same request again (the adapter now loaded). That
twice, for 2 adapters, per run. Reported: the added time to first token (cold minus warm) and the
running requests' p99 gap between tokens while the adapter loaded (from the cold request's arrival to
its first token) against before it. Not a test.

    .venv/bin/python bench/cold_load.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from http_server import make_bench_model, percentile, serve, stream, text_of_length
from transformers import AutoTokenizer

RUNNING, RUNNING_NEW, ADAPTERS_PER_RUN = 8, 200, 2
# A waiting request joins at the next step (`--waiting-served-ratio 0`): otherwise both the cold and the
# warm request wait up to `--max-waiting-tokens` steps for the admission policy, which hides the load.
LIMITS = ["--max-input-length", "256", "--max-total-tokens", "512", "--kv-cache-blocks", "1024",
          "--waiting-served-ratio", "0"]  # fmt: skip


def run(url: str, short: list[str], adapters: list[Path]) -> tuple[list[float], list[float], list[float]]:
    """(steady gaps, gaps while an adapter loaded, cold minus warm time to first token per adapter)."""
    started = threading.Barrier(RUNNING + 1)

    def running(i: int):  # noqa: ANN202
        started.wait()
        return stream(url, short[i], max_new_tokens=RUNNING_NEW, ignore_eos_token=True)

    stream(url, "warm up", max_new_tokens=4)
    windows, added = [], []
    with ThreadPoolExecutor(RUNNING) as pool:
        futures = [pool.submit(running, i) for i in range(RUNNING)]
        started.wait()
        time.sleep(1.0)  # every running request generates: the steady state
        for adapter in adapters:
            params = dict(max_new_tokens=4, adapter_id=str(adapter), adapter_source="local")
            cold = stream(url, short[0], **params)
            warm = stream(url, short[0], **params)
            windows.append((cold.sent, cold.token_times[0]))
            added.append(cold.ttft - warm.ttft)
            time.sleep(0.5)
        answers = [f.result() for f in futures]
    first_load = windows[0][0]
    steady, during = [], []
    for a in answers:
        for t0, t1 in zip(a.token_times[1:], a.token_times[2:], strict=False):
            if t1 <= first_load:
                steady.append(t1 - t0)
            elif any(t0 < end and t1 > start for start, end in windows):
                during.append(t1 - t0)
    return steady, during, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    steady, during, added = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = make_bench_model(Path(tmp), ADAPTERS_PER_RUN * args.repeats)
        tok = AutoTokenizer.from_pretrained(model)
        short = [text_of_length(tok, 16, seed=i + 1) for i in range(RUNNING)]
        for r in range(args.repeats):  # a fresh server each time: its adapters are cold
            with serve(model, *LIMITS, log_dir=Path(tmp)) as url:
                s, d, a = run(url, short, adapters[r * ADAPTERS_PER_RUN : (r + 1) * ADAPTERS_PER_RUN])
            steady += s
            during += d
            added += a
    print("| measure | value |")
    print("|---|---:|")
    print(f"| added time to first token, cold rank-16 adapter (mean of {len(added)}) | "
          f"{statistics.mean(added) * 1000:.0f} ms |")  # fmt: skip
    print(f"| running requests' ITL p99, steady | {percentile(steady, 0.99) * 1000:.0f} ms |")
    print(f"| running requests' ITL p99, during the loads | {percentile(during, 0.99) * 1000:.0f} ms |")
    print(f"| during / steady | {percentile(during, 0.99) / percentile(steady, 0.99):.2f}× |")


if __name__ == "__main__":
    main()
