"""The engine's CPU settings and plans, measured on the bench workload in one run: each variant serves
the same requests in-process in a fresh process, and its tokens/s is compared with the default's.

Variants: the default (dense weights packed for oneDNN, the C++ paged attention kernels, the C++ LoRA
kernel, the C++ RMSNorm and rotary kernels, torch's default thread count, glibc malloc keeping the
memory a step frees for the next one); torch's BLAS on the dense weights (`LORAX_PACKED_WEIGHTS=0`);
the torch reference paths (`LORAX_CPU_KERNELS=0`: all of them); RMSNorm and rotary in torch ops;
LoRA's torch plans alone (the grid on decode steps, the segment loop on prompts); the segment loop on
decode steps too; one intra-op thread instead of one per core; glibc's malloc defaults
(`LORAX_KEEP_FREED_MEMORY=0`).
The workload is bench/adapter_throughput.py's (64 requests, prompts and outputs of 16-128 tokens), with
8 adapters round-robin, and without adapters. Prints a table; not a test.

    .venv/bin/python bench/cpu_settings.py [--requests 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VARIANTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    "torch's BLAS, weights not packed (LORAX_PACKED_WEIGHTS=0)": ({"LORAX_PACKED_WEIGHTS": "0"}, []),
    "torch attention, norm, rotary and LoRA plans (LORAX_CPU_KERNELS=0)": ({"LORAX_CPU_KERNELS": "0"}, []),
    "RMSNorm and rotary in torch ops": ({}, ["--norm-rotary-ops"]),
    "LoRA's torch plans (grid on decode steps)": ({}, ["--lora-plans"]),
    "LoRA's segment loop on decode steps": ({}, ["--lora-plans", "--lora-loop"]),
    "1 intra-op thread": ({"OMP_NUM_THREADS": "1"}, []),
    "glibc malloc defaults (LORAX_KEEP_FREED_MEMORY=0)": ({"LORAX_KEEP_FREED_MEMORY": "0"}, []),
}


def child(args: argparse.Namespace) -> None:
    """One measurement in this process: prints {"tokens": n, "seconds": s} as the last line."""
    sys.path.insert(0, str(BENCH))
    from adapter_throughput import run_ours
    from shard_throughput import workload
    from transformers import AutoTokenizer

    if args.norm_rotary_ops:
        from lorax_server.layers import fused_cpu

        fused_cpu.kernel_applies = lambda *tensors: False
    if args.lora_plans:
        from lorax_server.adapters import lora_cpu

        lora_cpu.kernel_applies = lambda y, x: False  # the kernel's own switch would also turn off attention's
    if args.lora_loop:
        from lorax_server.forward import LoraGroups

        LoraGroups.MAX_PADDING = 0.0  # no grid is ever cheap enough: every step loops over segments
    root = Path(args.child)
    adapters = sorted(root.glob("adapter-*"))
    work = workload(args.requests, AutoTokenizer.from_pretrained(root / "model").vocab_size)
    tokens, seconds = run_ours(root / "model", adapters, work, args.adapters > 0, 4096)
    print(json.dumps({"tokens": tokens, "seconds": seconds}))


def measure(root: Path, env: dict[str, str], flags: list[str], requests: int, adapters: int) -> float:
    command = [sys.executable, __file__, "--child", str(root), "--requests", str(requests)]
    command += ["--adapters", str(adapters), *flags]
    out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tokens"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--norm-rotary-ops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora-plans", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from http_server import make_bench_model

    with tempfile.TemporaryDirectory() as tmp:
        make_bench_model(Path(tmp), 8)
        rows = []
        for name, (env, flags) in VARIANTS.items():
            row = [name]
            for adapters in (0, 8):
                row.append(max(measure(Path(tmp), env, flags, args.requests, adapters) for _ in range(args.repeats)))
            rows.append(row)
            print(f"{name}: {row[1]:.1f} tok/s without adapters, {row[2]:.1f} with 8", flush=True)
    base = rows[0]
    print(f"\n{args.requests} requests in-process, best of {args.repeats}; ratios against the default in this run\n")
    print("| variant | tok/s, no adapters | vs default | tok/s, 8 adapters | vs default | 8 adapters' cost |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, none, eight in rows:
        cost = 100 * (1 - eight / none)
        print(f"| {name} | {none:.1f} | {none / base[1]:.2f} | {eight:.1f} | {eight / base[2]:.2f} | {cost:.1f}% |")


if __name__ == "__main__":
    main()
