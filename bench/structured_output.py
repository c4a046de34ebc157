"""Constrained against unconstrained decoding on the same workload, and the first-request compile
time of a typical schema, measured in one run.

Model: a random Llama (hidden 512, 4 layers) with a real 130k byte-level vocabulary (Mistral's
Tekken, see bench/grammar_backends.py), so the masks have the width they have in production.
Workload: N requests, prompts of 16-64 tokens, up to 64 new tokens each, served with continuous
batching as the router does (bench/shard_throughput.py), greedy:
- unconstrained: ignore_eos, every request generates its 64 tokens;
- constrained: every request constrained to `{"answer": <string of at least 5000 characters>}`, which
  no 64 tokens can close (the longest token has 76 characters), so every request generates its 64
  tokens as in the unconstrained run: the same work, plus the masks;
- mixed: every other request constrained.
Prints a table of tokens/s and ratios; not a test.

    .venv/bin/python bench/structured_output.py [--requests 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "server" / "tests"))
sys.path.insert(0, str(BENCH))
from grammar_backends import SCHEMA, tekken_tokenizer  # noqa: E402
from shard_throughput import serve_all  # noqa: E402
from tiny_models import save_model  # noqa: E402

from lorax_server.batch import RequestIn  # noqa: E402
from lorax_server.engine import CacheConfig, Engine  # noqa: E402
from lorax_server.grammar import GrammarCompiler, GrammarKind, GrammarSpec  # noqa: E402
from lorax_server.layers.attention import TorchAttention  # noqa: E402
from lorax_server.models.loader import load_model  # noqa: E402
from lorax_server.sampling import SamplingParams  # noqa: E402

ANSWER = GrammarSpec(
    GrammarKind.JSON,
    json.dumps(
        {"type": "object", "properties": {"answer": {"type": "string", "minLength": 5000}}, "required": ["answer"]}
    ),
)
NEW_TOKENS = 64


def make_model(out_dir: Path):  # noqa: ANN201 - (model dir, tokenizer)
    tok = tekken_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(config), tok, out_dir)
    return out_dir, tok


def workload(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(1000, vocab, (int(torch.randint(16, 65, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def run(engine: Engine, prompts: list[list[int]], constrained) -> tuple[int, float]:  # noqa: ANN001
    requests = [
        RequestIn(
            id=i,
            input_ids=ids,
            sampling=SamplingParams(),
            max_new_tokens=NEW_TOKENS,
            ignore_eos=True,
            grammar=ANSWER if constrained(i) else None,
        )
        for i, ids in enumerate(prompts)
    ]
    return serve_all(engine, requests, 2048)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok = make_model(Path(tmp))
        # First request's cost on a fresh server: the vocabulary set-up (once per server), then the schema.
        compiler = GrammarCompiler(tok, len(tok), {tok.eos_token_id})
        start = time.perf_counter()
        compiler._xgr_compiler()
        setup = time.perf_counter() - start
        start = time.perf_counter()
        compiler.compile(GrammarSpec(GrammarKind.JSON, json.dumps(SCHEMA)))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        compiler.compile(GrammarSpec(GrammarKind.JSON, json.dumps(SCHEMA)))
        cached_s = time.perf_counter() - start

        model = load_model(model_dir, TorchAttention(16), torch.device("cpu"), "float32")
        engine = Engine(model, tok, CacheConfig(16, num_blocks=1024))
        engine.warmup(128, 2048, 256)
        engine.compile_grammar(ANSWER)  # as the router does before queueing
        prompts = workload(args.requests, len(tok))
        modes = {"unconstrained": lambda i: False, "constrained": lambda i: True, "mixed (half)": lambda i: i % 2 == 0}
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every mode alike
            for mode, constrained in modes.items():
                tokens, seconds = run(engine, prompts, constrained)
                rates[mode].append(tokens / seconds)

    print(f"vocabulary {len(tok)}; {args.requests} requests; best of {args.repeats} runs\n")
    print("| mode | tokens/s | vs unconstrained |")
    print("|---|---:|---:|")
    base = max(rates["unconstrained"])
    for mode, r in rates.items():
        print(f"| {mode} | {max(r):.1f} | {max(r) / base:.2f}x |")
    print(
        f"\nvocabulary set-up (once per server): {setup:.2f} s; typical schema ({len(json.dumps(SCHEMA))} bytes) "
        f"first compile: {compile_s * 1e3:.0f} ms, cached: {cached_s * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
