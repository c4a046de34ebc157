"""Prefix caching through the launcher over HTTP, with and without `--prefix-caching`, in one run.

Workload (issue 12): 64 requests arrive at once (sent in order from one thread: `stream_all`), each a
200-token system prompt shared by all plus its own 24-token question, round-robin over 4 rank-16 adapters
on the 26M bench model (bench/http_server.py), 32 new tokens each (greedy, EOS ignored). Each server is
warmed with one request per adapter (other prompts), so adapter loading is not timed. Reports mean and
p90 time to first token and tokens/s (generated tokens over the wall time of the 64), checks that both
servers give the same answers, and writes bench/prefix_caching.png. Under two admission policies: the
router's default (`--waiting-served-ratio 1.2`: once 36 requests run, the other 28 wait until 1.2 × as
many wait, or for `--max-waiting-tokens` decode steps) and `--waiting-served-ratio 0` (waiting requests
join at the next step). Not a test.

    .venv/bin/python bench/prefix_caching.py [--requests 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from http_server import Streamed, make_bench_model, percentile, serve, stream, stream_all, text_of_length
from transformers import AutoTokenizer

BENCH = Path(__file__).resolve().parent
LIMITS = ["--max-input-length", "256", "--max-total-tokens", "320", "--max-batch-prefill-tokens", "4096",
          "--kv-cache-blocks", "2048"]  # fmt: skip
NEW_TOKENS = 32


def run(url: str, prompts: list[str], adapters: list[Path]) -> tuple[list[Streamed], float]:
    for i, adapter in enumerate(adapters):  # load every adapter first, on prompts that share nothing
        stream(url, f"warm up {i}", max_new_tokens=2, adapter_id=str(adapter), adapter_source="local")
    bodies = []
    for i, prompt in enumerate(prompts):
        parameters = {"max_new_tokens": NEW_TOKENS, "ignore_eos_token": True, "adapter_source": "local"}
        bodies.append({"inputs": prompt, "parameters": {**parameters, "adapter_id": str(adapters[i % len(adapters)])}})
    start = time.perf_counter()
    answers = stream_all(url, bodies)
    return answers, time.perf_counter() - start


def plot(rows: dict[str, tuple[float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    labels = [n.replace(", ", "\n") for n in names]
    fig, (ax_ttft, ax_tps) = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.38
    xs = range(len(names))
    ax_ttft.bar([x - width / 2 for x in xs], [rows[n][0] for n in names], width, label="mean")
    ax_ttft.bar([x + width / 2 for x in xs], [rows[n][1] for n in names], width, label="p90")
    ax_ttft.set_xticks(list(xs), labels)
    ax_ttft.set_ylabel("time to first token (s)")
    ax_ttft.legend()
    ax_tps.bar(list(xs), [rows[n][2] for n in names], 0.5, color="tab:green")
    ax_tps.set_xticks(list(xs), labels)
    ax_tps.set_ylabel("generated tokens/s")
    ax_ttft.tick_params(axis="x", labelsize=7)
    ax_tps.tick_params(axis="x", labelsize=7)
    fig.suptitle("64 requests sharing a 200-token system prompt, 4 adapters (HTTP, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = make_bench_model(Path(tmp), 4)
        tok = AutoTokenizer.from_pretrained(model)
        system = text_of_length(tok, 200, seed=0)
        prompts = [f"{system}\n{text_of_length(tok, 24, seed=i + 1)}" for i in range(args.requests)]
        lengths = [len(tok(p).input_ids) for p in prompts]
        print(f"prompts of {min(lengths)}-{max(lengths)} tokens, {NEW_TOKENS} new tokens each")
        modes = {
            "off": [],
            "--prefix-caching": ["--prefix-caching"],
            "off, ratio 0": ["--waiting-served-ratio", "0"],
            "--prefix-caching, ratio 0": ["--prefix-caching", "--waiting-served-ratio", "0"],
        }
        results: dict[str, list[tuple[list[Streamed], float]]] = {m: [] for m in modes}
        for _ in range(args.repeats):  # alternate, so a change of machine load hits both alike
            for mode, flags in modes.items():
                with serve(model, *LIMITS, *flags, log_dir=Path(tmp)) as url:
                    results[mode].append(run(url, prompts, adapters))
    rows = {}
    print("| server | mean TTFT s | p90 TTFT s | tokens/s | mean TTFT vs off |")
    print("|---|---:|---:|---:|---:|")
    for mode, runs in results.items():
        ttfts = [a.ttft for answers, _ in runs for a in answers]
        tokens = sum(len(a.token_ids) for answers, _ in runs for a in answers)
        seconds = sum(s for _, s in runs)
        rows[mode] = (statistics.mean(ttfts), percentile(ttfts, 0.9), tokens / seconds)
    for mode, (mean, p90, tps) in rows.items():
        base = rows["off, ratio 0" if mode.endswith("ratio 0") else "off"][0]  # same policy, no caching
        print(f"| {mode} | {mean:.2f} | {p90:.2f} | {tps:.1f} | {base / mean:.2f}× |")
    reference = [a.token_ids for a in results["off"][0][0]]
    same = sum(a.token_ids == want for runs in results.values() for answers, _ in runs
               for a, want in zip(answers, reference, strict=True))  # fmt: skip
    print(f"same answers on every server and run: {same}/{args.requests * args.repeats * len(results)}")
    plot(rows, BENCH / "prefix_caching.png")
    print(f"wrote {BENCH / 'prefix_caching.png'}")


if __name__ == "__main__":
    main()
