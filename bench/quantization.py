"""Every CPU `--quantize` method against the float32 base, measured in one run.

Per method, in a fresh process each (so that resident memory is the method's own):
- linear-weight bytes: what the decoder layers' linear weights keep resident (scales, zeros and
  act-order permutations included), and the ratio to float32;
- RSS: the process's resident memory after loading the model and warming up, minus the RSS before
  loading and minus the KV cache (the same for every method): the weights and the warm-up's peak;
- tokens/s on the standard workload of bench/shard_throughput.py (26M Llama, hidden 512, 8 layers; 64
  requests, prompts 16-128, outputs 16-128, greedy, continuous batching), and the ratio to float32;
- quality on the trained demo model (models/demo): top-1 agreement with float32, i.e. the share of
  positions where the method's greedy token equals float32's when both read float32's own greedy
  answers (teacher-forced, so one early difference does not count twice), and the share of answers
  that are identical.
GPTQ and AWQ checkpoints (4-bit, group 128) are written by the tests' packers from the same weights.

    .venv/bin/python bench/quantization.py [--requests 64] [--methods fp32,eetq,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server" / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from quant_packers import awq_pack, gptq_pack, write_prequantized  # noqa: E402
from shard_throughput import MODEL, serve_all, workload  # noqa: E402
from tiny_models import make_llama  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lorax_server.batch import RequestIn  # noqa: E402
from lorax_server.engine import CacheConfig, Engine  # noqa: E402
from lorax_server.layers.attention import TorchAttention  # noqa: E402
from lorax_server.models.loader import load_model  # noqa: E402
from lorax_server.sampling import SamplingParams  # noqa: E402

METHODS = [
    "fp32", "eetq", "bitsandbytes", "fp8", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq",
    "hqq-4bit", "hqq-3bit", "hqq-2bit",
]  # fmt: skip
PRE_QUANTIZED = ("gptq", "awq")
DEMO = ROOT / "models" / "demo"
ANSWER_TOKENS = 12
CHUNK = 8


def demo_prompts() -> list[str]:
    sums = [f"Q: What is {a} + {b}?\nA:" for a in range(0, 21, 3) for b in range(0, 21, 4)]
    differences = [f"Q: What is {a} - {b}?\nA:" for a in range(10, 21, 2) for b in range(0, 10, 3)]
    copies = [f"Q: Copy: {w}\nA:" for w in ("apple river", "x y z", "12 7 99", "GREEN stone", "a b c d")]
    return sums + differences + copies


def linear_bytes(model) -> tuple[int, int]:  # noqa: ANN001
    """(bytes the decoder's linear weights keep resident, their float32 bytes)."""
    kept = dense = 0
    for layer in model.layers:
        for linear in layer.linears():
            w = linear.weight
            if isinstance(w, torch.Tensor):
                kept += w.numel() * w.element_size()
                dense += w.numel() * 4
            else:
                kept += w.nbytes()
                dense += w.out_features * w.in_features * 4
    return kept, dense


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str]) -> list[list[int]]:  # noqa: ANN001
    from ragged_runs import run_ours

    ids = [torch.tensor(tok(p).input_ids) for p in prompts]
    answers = []
    for start in range(0, len(ids), CHUNK):  # the helper's cache holds a few prompts at a time
        _, decoded = run_ours(model, ids[start : start + CHUNK], ANSWER_TOKENS)
        answers += decoded.argmax(-1).tolist()
    return answers


@torch.no_grad()
def teacher_forced(model, tok, prompts: list[str], answers: list[list[int]]) -> list[list[int]]:  # noqa: ANN001
    """The model's argmax after each prefix of prompt + float32's answer."""
    from ragged_runs import run_ours

    seqs = [torch.tensor(tok(p).input_ids + a[:-1]) for p, a in zip(prompts, answers, strict=True)]
    prefill = []
    for start in range(0, len(seqs), CHUNK):
        prefill += run_ours(model, seqs[start : start + CHUNK], 1)[0]
    return [logits[-len(a) :].argmax(-1).tolist() for logits, a in zip(prefill, answers, strict=True)]


def child(method: str, model_dir: Path, demo_dir: Path, answers_file: Path, requests: int) -> dict:
    rss_before = psutil.Process().memory_info().rss
    quantize = None if method == "fp32" or method in PRE_QUANTIZED else method
    model = load_model(model_dir, TorchAttention(16), torch.device("cpu"), "float32", quantize=quantize)
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(model, tok, CacheConfig(16, num_blocks=2048))
    engine.warmup(256, 4096, 512)
    cache = engine.cache
    cache_bytes = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    rss = psutil.Process().memory_info().rss - rss_before - cache_bytes
    kept, dense = linear_bytes(model)
    work = workload(requests, tok.vocab_size)
    reqs = [
        RequestIn(id=i, input_ids=ids, sampling=SamplingParams(), max_new_tokens=o, ignore_eos=True)
        for i, (ids, o) in enumerate(work)
    ]
    tokens, seconds = serve_all(engine, reqs, 4096)
    demo = load_model(demo_dir, TorchAttention(4), torch.device("cpu"), "float32", quantize=quantize)
    demo_tok = AutoTokenizer.from_pretrained(demo_dir)
    prompts = demo_prompts()
    result = {"method": method, "kept": kept, "dense": dense, "rss": rss, "tokens": tokens, "seconds": seconds}
    if method == "fp32":
        result["answers"] = greedy_answers(demo, demo_tok, prompts)
    else:
        reference = json.loads(answers_file.read_text())
        result["forced"] = teacher_forced(demo, demo_tok, prompts, reference)
        result["answers"] = greedy_answers(demo, demo_tok, prompts)
    return result


def quality(result: dict, reference: list[list[int]], eos: int) -> tuple[float, float]:
    """(teacher-forced top-1 agreement, identical answers), answers compared up to their first EOS."""

    def cut(a: list[int]) -> list[int]:
        return a[: a.index(eos) + 1] if eos in a else a

    agree = total = 0
    for forced, ref in zip(result["forced"], reference, strict=True):
        n = len(cut(ref))
        agree += sum(f == r for f, r in zip(forced[:n], ref[:n], strict=True))
        total += n
    same = sum(cut(a) == cut(r) for a, r in zip(result["answers"], reference, strict=True))
    return agree / total, same / len(reference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--demo", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--answers", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.model), Path(args.demo), Path(args.answers), args.requests)))
        return
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        base = make_llama(Path(tmp) / "base", **MODEL)
        dirs = {m: (base, DEMO) for m in methods}
        packers = {
            "gptq": ({"bits": 4, "group_size": 128, "desc_act": False, "sym": False}, lambda w: gptq_pack(w, 4, 128)),
            "awq": ({"bits": 4, "group_size": 128, "version": "gemm"}, lambda w: awq_pack(w, 128)),
        }
        for method in [m for m in methods if m in packers]:  # the bench model and the demo model, packed
            config, pack = packers[method]
            packed = []
            for name, source in (("bench", base), ("demo", DEMO)):
                dense = load_model(source, TorchAttention(16), torch.device("cpu"), "float32")
                out = Path(tmp) / f"{method}-{name}"
                packed.append(write_prequantized(source, dense, out, Path(tmp) / f"{method}-{name}-ref", method,
                                                 config, pack)[0])  # fmt: skip
            dirs[method] = tuple(packed)
        answers = Path(tmp) / "answers.json"
        results = {}
        for method in ["fp32"] + [m for m in methods if m != "fp32"]:
            model_dir, demo_dir = dirs.get(method, (base, DEMO))
            cmd = [sys.executable, __file__, "--child", method, "--model", str(model_dir), "--demo", str(demo_dir),
                   "--answers", str(answers), "--requests", str(args.requests)]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if run.returncode:
                raise SystemExit(f"{method} failed:\n{run.stderr[-3000:]}")
            results[method] = json.loads(run.stdout.strip().splitlines()[-1])
            if method == "fp32":
                answers.write_text(json.dumps(results["fp32"]["answers"]))
    report(results, AutoTokenizer.from_pretrained(DEMO).eos_token_id, args.requests)


def report(results: dict, eos: int, requests: int) -> None:
    base = results["fp32"]
    base_tps = base["tokens"] / base["seconds"]
    print("| method | linear-weight bytes | vs fp32 | RSS after warm-up (no KV cache) | tokens/s | vs fp32 "
          "| top-1 agreement | same answers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for method, r in results.items():
        tps = r["tokens"] / r["seconds"]
        agree, same = (1.0, 1.0) if method == "fp32" else quality(r, base["answers"], eos)
        ratio = r["kept"] / base["dense"]
        print(f"| {method} | {r['kept'] / 2**20:.1f} MiB | {ratio:.3f} | {r['rss'] / 2**20:.0f} MiB | {tps:.1f} | "
              f"{tps / base_tps:.2f} | {agree:.3f} | {same:.3f} |")  # fmt: skip
    print(f"\n{requests} requests, prompts 16-128, outputs 16-128, greedy, float32 activations, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; quality on models/demo "
          f"({len(demo_prompts())} Q/A prompts); gptq and awq: 4-bit, group 128, round-to-nearest in their "
          "layouts (the tests' packers; a calibrated GPTQ would score higher)")  # fmt: skip


if __name__ == "__main__":
    main()
