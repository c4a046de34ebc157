"""The headline throughput: generated tokens/s through the launcher over HTTP against transformers + peft,
by the number of distinct adapters, and the router + gRPC overhead, in one run.

Workload (DESIGN.md): the 26M bench model (bench/http_server.py), 64 requests arriving at once, in order,
prompts of 16-128 tokens and outputs of 16-128 tokens (EOS ignored), greedy, float32; requests assigned
to the adapters round-robin (rank 16, all linear layers; none for 0). The adapter files are float32,
or with `--adapter-dtype` 16-bit (kept so by the server, widened by peft; the plot then gets the dtype in
its name).
- ours over HTTP: one server per adapter count, all of them up at once; every adapter is loaded
  before the timed requests (one warm-up request each, then one untimed pass of the requests), so
  loading and a new server's one-time costs are not timed. The passes go in rounds: each round runs
  the requests once on every server and once in-process, starting one later in that list than the
  round before, so every row sees the same spells of this noisy machine; each row reports its best
  round, and each cost is also given as the median over rounds of that round's pair;
- transformers + peft: static left-padded batches, each row with its own adapter (`adapter_names`), at
  its best batch size among 16, 32 and 64 (each measured);
- ours in-process: the engine on the same requests without adapters (bench/shard_throughput.py's
  loop, admitting requests with the router's default policy): HTTP without adapters against it is the
  router + gRPC overhead.
Prints a table, writes bench/http_throughput.png. Not a test.

    .venv/bin/python bench/http_throughput.py [--adapters 0 1 8 32 128] [--requests 64] [--rounds 3]
        [--decode-steps-per-call 8] [--adapter-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import requests
import torch
from http_server import InOrder, make_bench_model, serve, text_of_length
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_throughput import ADAPTER_DTYPES, run_peft  # noqa: E402
from shard_throughput import ROUTER_POLICY, run_transformers, workload  # noqa: E402
from shard_throughput import run_ours as run_in_process  # noqa: E402

BENCH = Path(__file__).resolve().parent
LIMITS = ["--max-input-length", "256", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "4096",
          "--kv-cache-blocks", "2048", "--max-active-adapters", "128", "--adapter-memory-fraction", "0.2"]  # fmt: skip
BATCH_SIZES = (16, 32, 64)


def parameters(adapters: list[Path], i: int, new_tokens: int) -> dict:
    """Request `i`'s parameters: its adapter round-robin (none without adapters)."""
    p = {"max_new_tokens": new_tokens, "ignore_eos_token": True, "details": True}
    if adapters:
        p.update(adapter_id=str(adapters[i % len(adapters)]), adapter_source="local")
    return p


def load_adapters(url: str, adapters: list[Path]) -> None:
    """Every adapter loaded (one request each) before the clock starts."""
    for i in range(len(adapters)):
        body = {"inputs": "warm", "parameters": parameters(adapters, i, 1)}
        requests.post(f"{url}/generate", json=body, timeout=600).raise_for_status()


def bench_requests(model: Path, n: int) -> tuple[list[str], list[int], list[tuple[list[int], int]]]:
    """The workload's `n` prompts (texts), their output lengths, and (token ids, output length) as the
    router sends them to the engine."""
    tok = AutoTokenizer.from_pretrained(model)
    lengths = workload(n, tok.vocab_size)
    prompts = [text_of_length(tok, len(ids) - 1, seed=i) for i, (ids, _) in enumerate(lengths)]  # + BOS
    outputs = [o for _, o in lengths]
    return prompts, outputs, [(tok(p).input_ids, o) for p, o in zip(prompts, outputs, strict=True)]


def run_http(url: str, prompts: list[str], outputs: list[int], adapters: list[Path]) -> tuple[int, float]:
    """Every request sent at once and in order, as in-process (`InOrder`), each answer read by a thread
    of its own. (Released from 64 threads at once, the requests arrived in a random order, which decided
    which requests the first prefill, full at 4,096 tokens, left to join 20 steps later: 130-146 decode
    steps a pass against 127 in order.)"""
    bodies = [
        {"inputs": p, "parameters": parameters(adapters, i, o)}
        for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]
    requests_ = InOrder(url, "/generate", bodies)

    def answer(i: int) -> int:
        return json.loads(requests_.response(i).read())["details"]["generated_tokens"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        start = time.perf_counter()
        requests_.send()
        answers = [pool.submit(answer, i) for i in range(len(prompts))]
        generated = sum(a.result() for a in answers)
    seconds = time.perf_counter() - start
    requests_.close()
    return generated, seconds


def best_baseline(model: Path, adapters: list[Path], work: list[tuple[list[int], int]]) -> tuple[float, int]:
    """(tokens/s, batch size) of the fastest static batch size."""
    best = (0.0, 0)
    for size in BATCH_SIZES:
        tokens, seconds = run_peft(model, adapters, work, size) if adapters else run_transformers(model, work, size)
        best = max(best, (tokens / seconds, size))
    return best


def plot(counts: list[int], ours: list[float], peft: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    xs = range(len(counts))
    ax.plot(list(xs), ours, "o-", label="lorax (HTTP, continuous batching)")
    ax.plot(list(xs), peft, "s--", label="transformers + peft (best static batch)")
    ax.set_xticks(list(xs), [str(c) for c in counts])
    ax.set_xlabel("distinct adapters in the workload")
    ax.set_ylabel("generated tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("64 requests, prompts and outputs 16-128 tokens (2 CPU cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure_ours(
    model: Path,
    adapters: list[Path],
    counts: list[int],
    work: list[tuple[list[int], int]],
    texts: tuple[list[str], list[int]],
    rounds: int,
    log_dir: Path,
    flags: list[str],
) -> tuple[dict[int, list[float]], list[float]]:
    """Tokens/s of every round on each adapter count's server (started with `flags` beside LIMITS), and of
    the engine in-process."""
    over_http: dict[int, list[float]] = {n: [] for n in counts}
    in_process: list[float] = []
    with ExitStack() as servers:
        urls = {n: servers.enter_context(serve(model, *LIMITS, *flags, log_dir=log_dir)) for n in counts}
        for n, url in urls.items():
            load_adapters(url, adapters[:n])
            run_http(url, *texts, adapters[:n])  # untimed: a new server's first pass pays one-time costs
        passes: list[int | None] = [*counts, None] if 0 in counts else list(counts)  # None: in-process
        for r in range(rounds):
            # Each round starts one later in the list, so no row always runs right after another.
            for n in passes[r % len(passes) :] + passes[: r % len(passes)]:
                if n is None:  # the servers sit idle meanwhile
                    tokens, seconds = run_in_process(model, work, 4096, ROUTER_POLICY)
                    in_process.append(tokens / seconds)
                else:
                    tokens, seconds = run_http(urls[n], *texts, adapters[:n])
                    over_http[n].append(tokens / seconds)
            print(f"round {r + 1}: " + ", ".join(f"{n} adapters {v[-1]:.1f}" for n, v in over_http.items())
                  + (f", in-process {in_process[-1]:.1f}" if in_process else "") + " tok/s", flush=True)  # fmt: skip
    return over_http, in_process


def paired(slower: list[float], faster: list[float]) -> str:
    """The median, over rounds, of each round's 1 - slower/faster, and the rounds' values: on this noisy
    machine a pair measured minutes apart is steadier than two bests from different rounds."""
    costs = sorted(1 - s / f for s, f in zip(slower, faster, strict=True))
    return f"{statistics.median(costs):+.1%} ({', '.join(f'{c:+.1%}' for c in costs)})"


def print_table(
    rows: list[tuple[int, float, float, int]], over_http: dict[int, list[float]], local: list[float]
) -> None:
    none = over_http.get(0)
    print("\n| adapters | lorax HTTP tok/s (best round) | transformers + peft tok/s (best batch) | vs peft "
          "| cost vs 0 adapters (best rounds) | cost, median of rounds (each round) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for n, ours, baseline, size in rows:
        best = f"{1 - ours / max(none):+.1%}" if none else "n/a"
        rounds = paired(over_http[n], none) if none and n else "n/a"
        print(f"| {n} | {ours:.1f} | {baseline:.1f} ({size}) | {ours / baseline:.2f}× | {best} | {rounds} |")
    if none and local:
        print(f"\nrouter + gRPC overhead: HTTP {max(none):.1f} tok/s against the engine in-process {max(local):.1f} "
              f"tok/s on the same requests: {1 - max(none) / max(local):+.1%} (best rounds); median of rounds "
              f"{paired(none, local)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-steps-per-call", type=int, default=8, help="the servers' flag (their default)")
    parser.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default="float32",
                        help="the adapter files' dtype (16-bit adapters keep it on the float32 model)")  # fmt: skip
    args = parser.parse_args()
    flags = ["--decode-steps-per-call", str(args.decode_steps_per_call)]
    stored = getattr(torch, args.adapter_dtype)
    png = BENCH / ("http_throughput.png" if stored == torch.float32 else f"http_throughput-{args.adapter_dtype}.png")
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = make_bench_model(Path(tmp), max(args.adapters), stored_dtype=stored)
        prompts, outputs, work = bench_requests(model, args.requests)
        over_http, local = measure_ours(
            model, adapters, args.adapters, work, (prompts, outputs), args.rounds, Path(tmp), flags
        )
        rows = []
        for n in args.adapters:
            baseline, size = best_baseline(model, adapters[:n], work)
            rows.append((n, max(over_http[n]), baseline, size))
            print(f"{n} adapters: ours {rows[-1][1]:.1f} tok/s, baseline {baseline:.1f} (batch {size})", flush=True)
    print_table(rows, over_http, local)
    print(f"{args.requests} requests, float32 model, {args.adapter_dtype} adapter files, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, --decode-steps-per-call {args.decode_steps_per_call}")  # fmt: skip
    plot([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
