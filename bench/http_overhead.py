"""Where the time of the HTTP path goes: per decode step, the router's call against what the shard says it
spent, and what is left, beside the engine driven in-process on the same requests. A profile aid for the
router + gRPC overhead of bench/http_throughput.py (same model, workload and limits); not a test.

Per pass it reads the router's /metrics before and after (lorax_batch_*_duration, docs/metrics.md) and
prints, per decode step in ms:
- call: a Decode as the router sees it; forward, host: the shard's forward pass and per-request work;
- rpc: the call's time outside the shard's handler (gRPC, the unix socket, both event loops);
- hand-out: the router passing tokens to requests after the call;
- between: the rest of the pass's time per step, outside any call and hand-out (the router's own loop).
The in-process row is the engine's own time per step and tokens/s without any of it.

With several `--decode-steps-per-call` values, one server per value is up at once and each round runs the
requests on every server and in-process, starting one later in that list than the round before; the
table then also has each server's overhead against the same round's in-process pass, and the medians.

    .venv/bin/python bench/http_overhead.py [--rounds 3] [--requests 64] [--decode-steps-per-call 1 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import requests
from http_server import make_bench_model, serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_throughput import LIMITS, bench_requests, run_http  # noqa: E402
from shard_throughput import ROUTER_POLICY  # noqa: E402
from shard_throughput import run_ours as run_in_process  # noqa: E402

from lorax_server.engine import Engine  # noqa: E402

SERIES = ("inference", "forward", "decode", "rpc_overhead", "filter")


def step_totals(url: str) -> dict[str, float]:
    """Seconds summed over the router's calls so far, by series (decode calls, and `prefill_` ones), and the
    number of decode steps."""
    values = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    totals = {"steps": values.get("lorax_batch_decode_steps", 0.0)}
    for method, prefix in (("decode", ""), ("prefill", "prefill_")):
        for s in SERIES:
            totals[prefix + s] = values.get(f'lorax_batch_{s}_duration_sum{{method="{method}"}}', 0.0)
    return totals


def engine_decode_seconds() -> list[float]:
    """Times every in-process `Engine.decode` call into the returned list."""
    spent: list[float] = []
    decode = Engine.decode

    def timed(self: Engine, batch_ids: list[int]):  # noqa: ANN202
        start = time.perf_counter()
        try:
            return decode(self, batch_ids)
        finally:
            spent.append(time.perf_counter() - start)

    Engine.decode = timed
    return spent


def http_pass(url: str, prompts: list[str], outputs: list[int]) -> tuple[float, int, dict[str, float], float]:
    """One pass of the requests over HTTP: tokens/s, decode steps, ms per step by series, and between."""
    before = step_totals(url)
    tokens, seconds = run_http(url, prompts, outputs, [])
    after = step_totals(url)
    d = {k: after[k] - before[k] for k in after}
    ms = {k: 1e3 * d[k] / d["steps"] for k in SERIES}
    calls = d["inference"] + d["filter"] + d["prefill_inference"] + d["prefill_filter"]
    return tokens / seconds, int(d["steps"]), ms, 1e3 * (seconds - calls) / d["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--decode-steps-per-call", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    in_process_steps = engine_decode_seconds()
    rows = []
    overheads: dict[int, list[float]] = {n: [] for n in args.decode_steps_per_call}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        model, _ = make_bench_model(Path(tmp), 0)
        prompts, outputs, work = bench_requests(model, args.requests)
        urls = {}
        for n in args.decode_steps_per_call:
            flags = [*LIMITS, "--decode-steps-per-call", str(n)]
            urls[n] = servers.enter_context(serve(model, *flags, log_dir=Path(tmp)))
            run_http(urls[n], prompts, outputs, [])  # untimed: a new server's one-time costs
        passes: list[int | None] = [*args.decode_steps_per_call, None]  # None: in-process
        for r in range(args.rounds):
            rates = {}
            for n in passes[r % len(passes) :] + passes[: r % len(passes)]:
                if n is None:
                    in_process_steps.clear()
                    tokens, seconds = run_in_process(model, work, 4096, ROUTER_POLICY)
                    rates[n] = tokens / seconds
                    step = 1e3 * statistics.fmean(in_process_steps)
                    rows.append((f"in-process, round {r + 1}", rates[n], len(in_process_steps), step, None))
                else:
                    rate, steps, ms, between = http_pass(urls[n], prompts, outputs)
                    rates[n] = rate
                    rows.append((f"HTTP, {n} step(s) a call, round {r + 1}", rate, steps, ms, between))
            for n in args.decode_steps_per_call:
                overheads[n].append(100 * (1 - rates[n] / rates[None]))
    print("\nper decode step, ms (HTTP: from the router's /metrics; in-process: Engine.decode's time)\n")
    print("| pass | tok/s | steps | call | forward | host | rpc | hand-out | between |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rate, steps, ms, between in rows:
        if between is None:
            print(f"| {name} | {rate:.1f} | {steps} | {ms:.2f} | | | | | |")
        else:
            print(f"| {name} | {rate:.1f} | {steps} | {ms['inference']:.2f} | {ms['forward']:.2f} | "
                  f"{ms['decode']:.2f} | {ms['rpc_overhead']:.2f} | {ms['filter']:.2f} | {between:.2f} |")  # fmt: skip
    print("\noverhead against the same round's in-process pass (1 - HTTP tok/s / in-process tok/s)\n")
    print("| decode steps a call | rounds | median |")
    print("|---:|---|---:|")
    for n, values in overheads.items():
        print(f"| {n} | {', '.join(f'{v:.1f}%' for v in values)} | {statistics.median(values):.1f}% |")


if __name__ == "__main__":
    main()
