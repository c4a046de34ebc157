"""Tensor parallelism on CPU: 1 rank against 2 ranks (real processes in one gloo group), measured in one run.

On bench/shard_throughput.py's model (a random Llama, hidden 512, 8 layers), float32, each variant in
fresh processes: 1 rank with 1 intra-op thread, 1 rank with 2 (the fair single-process baseline on 2
cores) and 2 ranks with 1 thread each; best of `--repeats` runs of each, in rounds. Every rank runs
the same steps; rank 0 reports:
- prefill of a batch of B prompts of 64 tokens (median of 3 after a warm-up), then decode steps of the
  B sequences (median after 3 warm-up steps), and the time rank 0 spent inside collectives;
- collectives per step and the bytes a rank contributed to them (`TensorParallel.collective_bytes`),
  and the latency of one layer all-reduce of the step's activations run alone, back to back;
- resident weight bytes per rank (every tensor the loaded model holds: the layers' linears, which are
  sharded; embedding and LM head, vocab-parallel; norms and rotary tables, replicated) and the process
  RSS after load. Prints tables with ratios against the 1-rank rows; not a test.

    .venv/bin/python bench/tensor_parallel.py [--steps 20] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

BLOCK, PROMPT, WARMUP, PREFILLS = 16, 64, 3, 3
VARIANTS = [("1 rank, 1 thread", 1, 1), ("1 rank, 2 threads", 1, 2), ("2 ranks, 1 thread each", 2, 1)]
MiB = 2**20


def model_tensors(obj: object, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `obj` through lorax_server objects, lists, tuples and dicts, once each."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from model_tensors(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from model_tensors(item, seen)
    elif type(obj).__module__.startswith("lorax_server") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from model_tensors(item, seen)


def weight_bytes(model: object) -> dict[str, int]:
    """Resident bytes of the model's tensors by how they are split: the decoder layers' linears
    (sharded), embedding and LM head (vocab-parallel), everything else (norms, rotary tables)."""
    seen: set[int] = set()

    def nbytes(tensors: Iterator[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    linears = [linear for layer in model.layers for linear in layer.linears()]  # type: ignore[attr-defined]
    out = {"layer linears": nbytes(model_tensors(linears, seen))}
    out["embedding + LM head"] = nbytes(model_tensors([model.embed, model.lm_head], seen))  # type: ignore[attr-defined]
    out["norms, rotary"] = nbytes(model_tensors(model, seen))
    return out


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@torch.no_grad()
def run_rank(model_dir: str, rank: int, world_size: int, steps: int, batch: int) -> dict:
    """Load this rank's model, prefill `batch` prompts and decode `steps` steps; what rank 0 reports."""
    import torch.distributed as dist

    from lorax_server.forward import ForwardBatch
    from lorax_server.kv_cache import BlockManager, KVCache
    from lorax_server.layers.attention import TorchAttention
    from lorax_server.layers.parallel import init_process_group
    from lorax_server.models.loader import load_model

    init_process_group(rank, world_size, torch.device("cpu"))
    model = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32", rank, world_size)
    result: dict = {"rss": rss_bytes(), "weights": weight_bytes(model)}
    tp, in_collectives = model.tp, [0.0]
    for name in ("all_reduce", "all_gather_columns"):  # time rank 0 spends inside collectives
        method = getattr(tp, name)

        def timed(*args, _method=method):  # noqa: ANN002, ANN202
            start = time.perf_counter()
            try:
                return _method(*args)
            finally:
                in_collectives[0] += time.perf_counter() - start

        setattr(tp, name, timed)

    layers, kv_heads, head_dim, dtype = model.cache_geometry
    per_seq = -(-(PROMPT + WARMUP + steps) // BLOCK)
    cache = KVCache(layers, batch * per_seq + 1, BLOCK, kv_heads, head_dim, dtype, torch.device("cpu"))
    blocks = BlockManager(batch * per_seq + 1, BLOCK)
    tables = torch.tensor([blocks.allocate(per_seq * BLOCK) for _ in range(batch)])
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (batch * PROMPT,), generator=g)

    def timed_steps(run: Callable[[int], torch.Tensor], n: int, warmup: int) -> tuple[list[float], ...]:
        """Per step: seconds, seconds inside collectives, collectives and bytes (after `warmup` steps)."""
        rows: list[tuple[float, ...]] = []
        for i in range(warmup + n):
            if tp.sharded:
                dist.barrier()  # start together; outside the counters and the clock
            count, sent, waited, start = tp.collectives, tp.collective_bytes, in_collectives[0], time.perf_counter()
            run(i)
            row = (time.perf_counter() - start, in_collectives[0] - waited, tp.collectives - count)
            if i >= warmup:
                rows.append((*row, tp.collective_bytes - sent))
        return tuple(list(col) for col in zip(*rows, strict=True))

    prefill_logits: list[torch.Tensor] = []

    def prefill(_: int) -> torch.Tensor:
        meta = ForwardBatch.build(prompts, [PROMPT] * batch, [PROMPT] * batch, tables, BLOCK)
        prefill_logits[:] = [model.forward(meta, cache)]
        return prefill_logits[0]

    next_ids: list[torch.Tensor] = []

    def decode(i: int) -> torch.Tensor:
        ids = next_ids[-1] if next_ids else prefill_logits[0].argmax(-1)
        meta = ForwardBatch.build(ids, [1] * batch, [PROMPT + i + 1] * batch, tables, BLOCK)
        logits = model.forward(meta, cache)
        next_ids[:] = [logits.argmax(-1)]
        return logits

    for phase, run, n, warmup in (("prefill", prefill, PREFILLS, 1), ("decode", decode, steps, WARMUP)):
        seconds, waited, count, sent = timed_steps(run, n, warmup)
        result[phase] = {
            "ms": 1000 * statistics.median(seconds),
            "collective_ms": 1000 * statistics.median(waited),
            "collectives": max(count),
            "bytes": max(sent),
        }
        assert min(count) == max(count) and min(sent) == max(sent), "every step should run the same collectives"
    if tp.sharded:  # one layer all-reduce of the phase's activations, alone, back to back
        for phase, tokens in (("decode", batch), ("prefill", batch * PROMPT)):
            x, seconds = torch.zeros(tokens, model.config.hidden_size), []
            for i in range(25):
                start = time.perf_counter()
                dist.all_reduce(x)
                if i >= 5:
                    seconds.append(time.perf_counter() - start)
            result[phase]["all_reduce_alone_ms"] = 1000 * statistics.median(seconds)
        dist.barrier()  # leave together: a rank exiting while another is still in the group aborts it
        dist.destroy_process_group()
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(model_dir: Path, world_size: int, threads: int, args: argparse.Namespace) -> dict:
    """Start `world_size` rank processes with `threads` intra-op threads each; rank 0's result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, __file__, "--child", str(model_dir), "--world-size", str(world_size)]
    command += ["--threads", str(threads), "--steps", str(args.steps), "--batch", str(args.batch)]
    procs = [
        subprocess.Popen(
            [*command, "--rank", str(r)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for r in range(world_size)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        if p.returncode:
            raise RuntimeError(f"rank {rank} exited {p.returncode}:\n{log[-4000:]}")
    return json.loads(next(line for line in reversed(logs[0].splitlines()) if line.startswith("{")))


def print_tables(results: list[tuple[str, dict]], args: argparse.Namespace) -> None:
    (_, one), (_, two_threads) = results[0], results[1]
    steps = f"medians of {args.steps} decode steps and {PREFILLS} prefills, best of {args.repeats} runs"
    print(f"\nbatch of {args.batch}, prompts of {PROMPT} tokens; {steps}")
    print("speed-up: the 1-rank time over this row's (> 1 is faster), same run\n")
    print("| variant | decode step ms | in collectives ms | vs 1 rank 1 thread | vs 1 rank 2 threads | "
          "prefill ms | in collectives ms | vs 1 rank 1 thread | vs 1 rank 2 threads |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results:
        cells = []
        for phase in ("decode", "prefill"):
            ms = r[phase]["ms"]
            waited = f"{r[phase]['collective_ms']:.1f}" if r[phase]["collectives"] else "-"
            cells += [f"{ms:.1f}", waited]
            cells += [f"{one[phase]['ms'] / ms:.2f}", f"{two_threads[phase]['ms'] / ms:.2f}"]
        print(f"| {name} | {' | '.join(cells)} |")

    print("\nper rank, per step: collectives, the bytes this rank contributed, and one layer all-reduce alone\n")
    columns = "collectives | KiB | one all-reduce alone ms"
    print(f"| variant | decode step: {columns} | prefill: {columns} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results:
        cells = []
        for phase in ("decode", "prefill"):
            p = r[phase]
            cells += [
                str(p["collectives"]),
                f"{p['bytes'] / 1024:.0f}",
                f"{p['all_reduce_alone_ms']:.2f}" if "all_reduce_alone_ms" in p else "-",
            ]
        print(f"| {name} | {' | '.join(cells)} |")

    kinds = list(one["weights"])
    print("\nresident per rank (MiB; ratio against 1 rank); RSS after load, before the KV cache\n")
    print(f"| variant | {' | '.join(kinds)} | all weights | ratio | RSS MiB |")
    print(f"|---|{'---:|' * (len(kinds) + 3)}")
    for name, r in results[::2]:  # threads do not change what a rank holds
        w, base = r["weights"], one["weights"]
        cells = [f"{w[k] / MiB:.2f} ({w[k] / base[k]:.2f})" for k in kinds]
        total, base_total = sum(w.values()), sum(base.values())
        print(f"| {name} | {' | '.join(cells)} | {total / MiB:.2f} | {total / base_total:.3f} | {r['rss'] / MiB:.0f} |")
    print(f"\nfloat32, gloo, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps")
    parser.add_argument("--batch", type=int, default=32, help="sequences in the batch")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        result = run_rank(args.child, args.rank, args.world_size, args.steps, args.batch)
        if args.rank == 0:
            print(json.dumps(result))
        return

    from shard_throughput import MODEL
    from tiny_models import make_llama  # on the path once shard_throughput is imported

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_llama(Path(tmp) / "bench", **MODEL)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in VARIANTS}
        for round_ in range(args.repeats):  # rounds over all variants, so that a busy spell hits them all
            for name, world_size, threads in VARIANTS:
                r = run_variant(model_dir, world_size, threads, args)
                runs[name].append(r)
                print(f"round {round_ + 1}, {name}: decode step {r['decode']['ms']:.1f} ms, "
                      f"prefill {r['prefill']['ms']:.1f} ms", flush=True)  # fmt: skip
    results = []
    for name, variant_runs in runs.items():  # each phase's best run
        best = {phase: min((r[phase] for r in variant_runs), key=lambda p: p["ms"]) for phase in ("decode", "prefill")}
        results.append((name, {**variant_runs[0], **best}))
    print_tables(results, args)


if __name__ == "__main__":
    main()
