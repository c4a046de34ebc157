#!/usr/bin/env python
"""Train the embedded demo model (`models/demo/`) from scratch on CPU, reproducibly.

    .venv/bin/python scripts/train_demo.py --out models/demo

Four steps, all seeded: (1) generate a synthetic corpus of our own design (small-number arithmetic,
copying, facts about an invented world, greetings, and the same tasks in chat form); (2) train a
byte-level BPE tokenizer on it; (3) train a tiny LlamaForCausalLM on packed sequences; (4) evaluate
greedily with `transformers` on held-out prompts and write the artifacts and a README.

Prompt formats the model learns (every document is wrapped in `<s>` ... `</s>`):

    Q: What is 12 + 7?\nA: 19</s>
    <s><|user|>\nWhat is 12 + 7?\n<|assistant|>\n19</s>            (the chat template)

Skills deliberately left out of the base (reversing, uppercasing, fixed answer formats, ...) are for
LoRA adapters: a later script can import this module and reuse `qa_segments`, `chat_segments`, `pack`,
`evaluate`, and the world/word lists with new task generators.

The steps live in three modules beside this one, by responsibility: `demo_data.py` (tasks, formats,
corpus), `demo_training.py` (tokenizer, model, packing, training loop) and `demo_eval.py` (greedy
generation, accuracy, the README). This one reads the flags, runs the steps in order and saves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from demo_data import (
    CHAT_TEMPLATE,
    EOS,
    LETTERS,
    PLANETS,
    ROLE_TOKENS,
    SEED,
    SPECIAL_TOKENS,
    WORDS,
    Example,
    Segment,
    add_example,
    arithmetic_split,
    chat_segments,
    fact_examples,
    make_corpus,
    qa_prompt,
    qa_segments,
    render_chat,
    sub_example,
)
from demo_eval import eval_sets, evaluate, generate, write_readme
from demo_training import check_segmentation, make_model, pack, train, train_tokenizer

# What adapter scripts import from here (the model's README names this module as their source).
__all__ = [
    "CHAT_TEMPLATE",
    "EOS",
    "LETTERS",
    "PLANETS",
    "SEED",
    "SPECIAL_TOKENS",
    "WORDS",
    "Example",
    "Segment",
    "add_example",
    "arithmetic_split",
    "chat_segments",
    "check_segmentation",
    "evaluate",
    "fact_examples",
    "generate",
    "pack",
    "qa_prompt",
    "qa_segments",
    "render_chat",
    "sub_example",
    "train",
]

# ---------------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/demo")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--docs", type=int, default=120_000, help="synthetic documents generated")
    p.add_argument("--vocab", type=int, default=1536)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block", type=int, default=256, help="packed sequence length")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--prompt-loss-weight", type=float, default=0.3, help="loss weight of non-answer tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-eval", action="store_true", help="save without evaluating or writing README.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    split = arithmetic_split(args.seed)
    docs = make_corpus(args.docs, split, args.seed)
    tokenizer = train_tokenizer(docs, args.vocab)
    check = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    assert tokenizer.apply_chat_template(check, tokenize=False) == render_chat(check)
    check_segmentation(docs[:2000], tokenizer)
    rows, mask = pack(docs, tokenizer, args.block)
    print(f"corpus: {len(docs)} docs, {rows.numel()} tokens, {mask.float().mean():.0%} of them trained")
    print(f"tokenizer: vocab {len(tokenizer)}; data ready in {time.time() - t0:.1f}s")

    model = make_model(len(tokenizer), args)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    seconds = train(model, rows, mask, args)
    print(f"trained {args.steps} steps x {args.batch} x {args.block} tokens in {seconds:.0f}s")

    save(model, tokenizer, out)
    if not args.skip_eval:
        scores = evaluate(model, tokenizer, eval_sets(split, args.seed))
        write_readme(out, model, tokenizer, scores, seconds, args)
    return 0


def save(model, tokenizer, out: Path) -> None:
    """Hugging Face layout: config.json, generation_config.json, model.safetensors (float32),
    tokenizer.json and tokenizer_config.json (with the chat template in it)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out, save_jinja_files=False)
    # Spell the tokenizer config the way transformers 4 also reads (transformers 5 reads both).
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", ROLE_TOKENS)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in sorted(os.listdir(out)):
        print(f"  {name:28s} {os.path.getsize(out / name) / 1e6:7.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
