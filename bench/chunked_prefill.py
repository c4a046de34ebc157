"""Inter-token latency of running requests while a 2,000-token prompt arrives, through the launcher over
HTTP, with and without `--chunked-prefill`, in one run.

Workload (issue 12): the 26M bench model (bench/http_server.py, 4,096 positions). 8 requests stream
(short prompts, 1,000 new tokens each, EOS ignored, so that they outlast the long prompt's prefill on
a fast machine too); once each has 32 tokens, a request with a 2,000-token prompt arrives. Reported
per server: the p50/p99 gap between tokens of the running requests before it arrived (steady) and
while its prompt was prefilled (from its arrival to its first token), and its time to first token.
Without chunking the prompt is computed in one step (prefill budget 2,100); with `--chunked-prefill`
in chunks of `--max-batch-prefill-tokens` (several sizes).
Writes bench/chunked_prefill.png. Not a test.

    .venv/bin/python bench/chunked_prefill.py [--chunks 32 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from http_server import make_bench_model, percentile, serve, start_streams, stream, text_of_length
from transformers import AutoTokenizer

BENCH = Path(__file__).resolve().parent
RUNNING, RUNNING_NEW = 8, 1000
STEADY_TOKENS = 32  # tokens each running request has before the long prompt is sent
LONG = 2000
LIMITS = ["--max-input-length", "2100", "--max-total-tokens", "2400", "--kv-cache-blocks", "1024"]


def run(url: str, short: list[str], long_prompt: str) -> tuple[list[float], list[float], float]:
    """(steady gaps, gaps while the long prompt was prefilled, its time to first token)."""
    stream(url, "warm up", max_new_tokens=4)
    with ThreadPoolExecutor(RUNNING) as pool:
        futures = start_streams(pool, url, short, STEADY_TOKENS, max_new_tokens=RUNNING_NEW, ignore_eos_token=True)
        long = stream(url, long_prompt, max_new_tokens=4, ignore_eos_token=True)
        answers = [f.result() for f in futures]
    window = (long.sent, long.token_times[0])
    if min(a.token_times[-1] for a in answers) < window[1]:
        raise RuntimeError("a running request finished before the long prompt's first token: raise RUNNING_NEW")
    steady, during = [], []
    for a in answers:
        for t0, t1 in zip(a.token_times[1:], a.token_times[2:], strict=False):  # the first gap is prefill
            if t1 <= window[0]:
                steady.append(t1 - t0)
            elif t0 < window[1]:  # the gap overlaps the long prompt's prefill
                during.append(t1 - t0)
    return steady, during, long.ttft


def plot(rows: dict[str, tuple[float, float, float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    xs = range(len(names))
    fig, (ax_itl, ax_ttft) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.38
    ax_itl.bar([x - width / 2 for x in xs], [rows[n][1] * 1000 for n in names], width, label="steady p99")
    ax_itl.bar([x + width / 2 for x in xs], [rows[n][3] * 1000 for n in names], width, label="during the prompt, p99")
    ax_itl.set_yscale("log")
    ax_itl.set_ylabel("inter-token latency of running requests (ms)")
    ax_itl.set_xticks(list(xs), names, fontsize=8)
    ax_itl.legend(fontsize=8)
    ax_ttft.bar(list(xs), [rows[n][4] for n in names], 0.5, color="tab:gray")
    ax_ttft.set_ylabel("the long prompt's time to first token (s)")
    ax_ttft.set_xticks(list(xs), names, fontsize=8)
    fig.suptitle(f"{RUNNING} requests generating while a {LONG}-token prompt arrives (HTTP, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    modes = {"one prefill step": ["--max-batch-prefill-tokens", "2100"]}
    for chunk in args.chunks:
        modes[f"--chunked-prefill, {chunk}"] = ["--chunked-prefill", "--max-batch-prefill-tokens", str(chunk)]
    results: dict[str, list[tuple[list[float], list[float], float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = make_bench_model(Path(tmp), 0, max_position_embeddings=4096)
        tok = AutoTokenizer.from_pretrained(model)
        long_prompt = text_of_length(tok, LONG, seed=0)
        short = [text_of_length(tok, 16, seed=i + 1) for i in range(RUNNING)]
        print(f"long prompt: {len(tok(long_prompt).input_ids)} tokens")
        for _ in range(args.repeats):  # alternate, so a change of machine load hits every server alike
            for mode, flags in modes.items():
                with serve(model, *LIMITS, *flags, log_dir=Path(tmp)) as url:
                    results[mode].append(run(url, short, long_prompt))
    rows = {}
    print("| server | steady ITL p50 ms | steady p99 ms | ITL during the prompt p50 ms | p99 ms | p99 vs steady | "
          "long prompt TTFT s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, runs in results.items():
        steady = [g for s, _, _ in runs for g in s]
        during = [g for _, d, _ in runs for g in d]
        ttft = sum(t for _, _, t in runs) / len(runs)
        row = (percentile(steady, 0.5), percentile(steady, 0.99), percentile(during, 0.5), percentile(during, 0.99))
        row = (*row, ttft)
        rows[mode] = row
        print(f"| {mode} | {row[0] * 1000:.0f} | {row[1] * 1000:.0f} | {row[2] * 1000:.0f} | {row[3] * 1000:.0f} | "
              f"{row[3] / row[1]:.2f}× | {ttft:.2f} |")  # fmt: skip
    plot(rows, BENCH / "chunked_prefill.png")
    print(f"wrote {BENCH / 'chunked_prefill.png'}")


if __name__ == "__main__":
    main()
