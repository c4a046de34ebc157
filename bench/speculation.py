"""Speculative decoding by prompt lookup (`--speculative-tokens`), with and without, in one run.

- copy-heavy, one stream, one request at a time: the demo `quote` adapter repeating passages of
  8-32 words it never trained on (`Quote: ...`, answered to end-of-sequence: an extraction-like
  answer copied whole from the prompt); the demo model and its adapters (base, answer-format, upper,
  reverse in turn) on few-shot prompts of the demo's Copy: task, continued for 48 tokens (the model
  repeats the prompt's question/answer pattern, copying from it); and lone Copy: questions answered to
  their end-of-sequence (a few tokens each).
- standard mixed workload (bench/adapter_throughput.py's: random Llama hidden 512, 8 layers, 8 rank-16
  adapters, 64 requests, prompts and outputs of 16-128 tokens), served as the router batches them.

Prints tokens/s, decode steps per generated token and the share of drafts kept; outputs are checked
identical. Not a test.

    .venv/bin/python bench/speculation.py [--tokens 4] [--repeats 3] [--mixed-repeats 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server" / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))
from adapter_throughput import ALL_LINEAR, engine_with_adapters  # noqa: E402
from demo_data import copy_example  # noqa: E402
from shard_throughput import MODEL, serve_all, workload  # noqa: E402
from tiny_models import make_llama, make_lora_adapter  # noqa: E402
from train_demo_adapters import held_out_passages  # noqa: E402

from lorax_server.batch import RequestIn  # noqa: E402
from lorax_server.engine import Engine  # noqa: E402
from lorax_server.sampling import SamplingParams  # noqa: E402
from lorax_server.speculation import SpeculationConfig, Speculator  # noqa: E402

DEMO = ROOT / "models" / "demo"
DEMO_ADAPTERS = [DEMO / "adapters" / name for name in ("answer-format", "upper", "reverse", "quote")]
QUOTE, MEDUSA = 4, 5  # the adapter indexes of the quote adapter and the Medusa heads


def set_speculation(engine: Engine, tokens: int, medusa: bool = False) -> None:
    adapters = engine.adapters if medusa else None
    on = tokens or adapters is not None
    engine.speculator = Speculator(SpeculationConfig(tokens), engine.model, engine.emitter, adapters) if on else None


def copy_prompts(tokenizer, n: int, shots: int) -> list[list[int]]:  # noqa: ANN001
    """`shots` solved Copy: questions then one of them again (shots=0: a lone Copy: question)."""
    rng = random.Random(7)
    prompts = []
    for _ in range(n):
        solved = [copy_example(rng) for _ in range(max(shots, 1))]
        text = "".join(f"Q: {q}\nA: {a}\n" for q, a in solved[:shots]) + f"Q: {solved[len(solved) // 2][0]}\nA:"
        prompts.append(tokenizer(text)["input_ids"])
    return prompts


def quote_prompts(tokenizer, n: int) -> list[list[int]]:  # noqa: ANN001
    """`Quote:` questions on passages of 8-32 words none of the adapters trained on."""
    return [tokenizer(f"Q: Quote: {p}\nA:")["input_ids"] for p in held_out_passages()[:n]]


def one_stream(
    engine: Engine, prompts: list[list[int]], max_new: int, ignore_eos: bool, adapters: list[int]
) -> tuple[list, int, float]:
    """Each prompt alone, in turn (with `adapters` in turn); (outputs, decode steps, seconds)."""
    outputs, steps = [], 0
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        r = RequestIn(
            i, ids, SamplingParams(), max_new, ignore_eos=ignore_eos, adapter_index=adapters[i % len(adapters)]
        )
        gens, batch = engine.prefill(i + 1, [r])
        out = [g.token_id for g in gens]
        while batch is not None:
            gens, batch = engine.decode([batch.id])
            steps += 1
            out += [g.token_id for g in gens]
        outputs.append(out)
    return outputs, steps, time.perf_counter() - start


def measure(name: str, run, engine: Engine, tokens: int, repeats: int, medusa: bool = False) -> list[tuple]:  # noqa: ANN001
    """Best of `repeats` runs each, plain and speculative, interleaved; checks identical outputs. With
    `medusa`, the speculative runs draft with the Medusa heads of the rows' adapters too."""
    variants = [(0, False), (tokens, medusa)]  # (--speculative-tokens, Medusa heads) of each row
    for k, heads in variants:  # warm-up: allocator, kernels' first calls
        set_speculation(engine, k, heads)
        run()
    best: list[tuple | None] = [None, None]
    for _ in range(repeats):
        for v, (k, heads) in enumerate(variants):
            set_speculation(engine, k, heads)
            outputs, steps, seconds = run()
            spec = engine.speculator
            kept = spec.accepted_tokens / max(spec.drafted_tokens, 1) if spec is not None else float("nan")
            if best[v] is None or seconds < best[v][2]:
                best[v] = (outputs, steps, seconds, kept)
    if best[0][0] != best[1][0]:
        raise SystemExit(f"{name}: outputs differ with speculation")
    rows = []
    for (k, heads), (outputs, steps, seconds, kept) in zip(variants, best, strict=True):
        generated = sum(len(o) for o in outputs) if isinstance(outputs[0], list) else outputs[0]
        label = "off" if not (k or heads) else ("Medusa" if heads else str(k))
        rows.append((name, label, generated, steps, seconds, kept))
    return rows


def demo_engine() -> Engine:
    """The demo model with its LoRA adapters at 1-4 (the quote adapter at QUOTE) and its Medusa heads
    at MEDUSA."""
    return engine_with_adapters(DEMO, [*DEMO_ADAPTERS, DEMO / "adapters" / "medusa"], 1024)


def mixed(tmp: Path, tokens: int, repeats: int) -> list[tuple]:
    model_dir = make_llama(tmp / "base", **MODEL)
    adapters = [
        make_lora_adapter(model_dir, tmp / f"a{i}", i, r=16, lora_alpha=32, target_modules=ALL_LINEAR) for i in range(8)
    ]
    work = workload(64, AutoTokenizer.from_pretrained(model_dir).vocab_size)
    engine = engine_with_adapters(model_dir, adapters, 4096)

    def run():  # noqa: ANN202
        requests = [
            RequestIn(i, ids, SamplingParams(), o, ignore_eos=True, adapter_index=i % 8 + 1)
            for i, (ids, o) in enumerate(work)
        ]
        steps = [0]
        decode = engine.decode

        def counted(ids):  # noqa: ANN001, ANN202
            steps[0] += 1
            return decode(ids)

        engine.decode = counted
        try:
            generated, seconds = serve_all(engine, requests, 4096)
        finally:
            engine.decode = decode
        return [generated], steps[0], seconds

    return measure("mixed workload, 8 adapters, 64 requests", run, engine, tokens, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4, help="--speculative-tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mixed-repeats", type=int, default=5, help="the mixed workload's (a noisier ratio)")
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = demo_engine()
    tok = AutoTokenizer.from_pretrained(DEMO)
    few_shot, single, quotes = copy_prompts(tok, 16, 6), copy_prompts(tok, 16, 0), quote_prompts(tok, 16)
    adapters = [0, 1, 2, 3]  # the base and the answer-format, upper and reverse adapters
    rows = measure("copy-heavy: Quote: 8-32 words, to EOS", lambda: one_stream(engine, quotes, 64, False, [QUOTE]),
                   engine, args.tokens, args.repeats)  # fmt: skip
    rows += measure("copy-heavy: 6-shot Copy:, 48 tokens", lambda: one_stream(engine, few_shot, 48, True, adapters),
                   engine, args.tokens, args.repeats)  # fmt: skip
    rows += measure("copy-heavy: Copy: answered to EOS", lambda: one_stream(engine, single, 48, False, adapters),
                    engine, args.tokens, args.repeats)  # fmt: skip
    rows += measure("Medusa heads, 6-shot, 48 tokens", lambda: one_stream(engine, few_shot, 48, True, [MEDUSA]),
                    engine, 0, args.repeats, medusa=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        rows += mixed(Path(tmp), args.tokens, args.mixed_repeats)
    print(f"| {'workload':<42} | {'drafts':>6} | {'tokens':>6} | {'steps/token':>11} | {'tokens/s':>8} | "
          f"{'vs plain':>8} | {'drafts kept':>11} |")  # fmt: skip
    print(f"|{'-' * 44}|{'-' * 8}|{'-' * 8}|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    plain_tps = {}
    for name, k, generated, steps, seconds, kept in rows:
        tps = generated / seconds
        plain_tps.setdefault(name, tps)
        kept_text = "" if k == "off" else f"{kept:.0%}"
        print(f"| {name:<42} | {k:>6} | {generated:>6} | {steps / generated:>11.2f} | {tps:>8.1f} | "
              f"{tps / plain_tps[name]:>8.2f} | {kept_text:>11} |")  # fmt: skip
    print(f"\nbest of {args.repeats} runs each ({args.mixed_repeats} for the mixed workload), greedy, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; steps: decode calls (prefill steps not "
          "counted)")  # fmt: skip


if __name__ == "__main__":
    main()
