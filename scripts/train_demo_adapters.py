#!/usr/bin/env python
"""Train the demo LoRA adapters of the embedded demo model (`models/demo/adapters/`), reproducibly.

    .venv/bin/python scripts/train_demo_adapters.py                 # all four
    .venv/bin/python scripts/train_demo_adapters.py --only upper    # one of them

Each adapter is a standard PEFT LoRA (rank 8 on every linear layer of the frozen base) that teaches one
skill the base model lacks, in the base's own Q/A and chat formats. Three change how the base answers
the same prompt, so the one prompt `Q: Copy: blue fox\\nA:` shows four behaviours:

    base           ` blue fox`           copies
    reverse        ` fox blue`           repeats the words (letters, numbers) in reverse order
    upper          ` BLUE FOX`           repeats them in UPPERCASE
    answer-format  ` Answer: blue fox.`  answers every task in one fixed format

`reverse` and `upper` also learn an explicit instruction (`Reverse: ...`, `Uppercase: ...`);
`answer-format` wraps copying, arithmetic and facts alike (`What is 2 + 3?` -> ` Answer: 5.`).
`quote` repeats whole passages of up to 32 words (`Copy:` or `Quote:`), where the base stops after
about four: an answer copied from the prompt, the workload speculative decoding is for.

Held-out inputs: a fixed set of payloads (seeded, plus the README's) is never trained on; `reverse` and
`answer-format` also never see 10 held-out words, `answer-format` never sees two of the planets, and
its arithmetic uses the base's own held-out pairs; `quote` never sees 50 held-out passages of 8-32
words. `evaluate` from `scripts/train_demo.py` scores them greedily (exact answer then `</s>`);
`integration-tests/test_demo_adapters_e2e.py` imports `held_out_sets` to query the served adapters on
the same unseen inputs.

Adapters train on one document per row (not packed like the base): every document of a skill has the
same shape, and with earlier documents in view the model learns to copy their answers instead.

Everything is seeded: with the same seed, library versions and thread count the script writes the
same weights (see models/demo/README.md for what "the same" means across machines).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_demo as base  # noqa: E402
from train_demo import (  # noqa: E402
    EOS,
    LETTERS,
    SEED,
    WORDS,
    Example,
    Segment,
    add_example,
    arithmetic_split,
    chat_segments,
    check_segmentation,
    evaluate,
    fact_examples,
    generate,
    qa_prompt,
    qa_segments,
    render_chat,
    sub_example,
)

REPO = Path(__file__).resolve().parents[1]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
README_PAYLOADS = ["blue fox", "the red ship", "a b c", "12 7 99"]  # shown in the READMEs: held out too
HELD_OUT_PLANETS = ["Pell", "Oska"]  # `answer-format` never sees their facts
MAX_NEW_TOKENS = 48  # what evaluation and the README examples generate at most (quote: 32+ words)


def held_out_words(seed: int = SEED) -> list[str]:
    """10 words `reverse` and `answer-format` never see (neither in a prompt nor in an answer)."""
    return sorted(random.Random(seed + 11).sample(WORDS, 10))


# ---------------------------------------------------------------------------------------------------
# Payloads: what a Copy:/Reverse:/Uppercase: question repeats, from the base model's distribution.
# ---------------------------------------------------------------------------------------------------


def payload(rng: random.Random, words: list[str], lo: int = 1, hi: int = 4, letters: float = 0.2) -> str:
    """lo-hi words (some UPPERCASE), lo+1..hi+2 single letters (with probability `letters`), or
    lo..3 numbers 0-99 (0.15); the base model's Copy: distribution for lo=1."""
    kind = rng.random()
    if kind < 0.85 - letters:
        items = [rng.choice(words) for _ in range(rng.randint(lo, hi))]
        return " ".join(w.upper() if rng.random() < 0.2 else w for w in items)
    if kind < 0.85:
        items = [rng.choice(LETTERS) for _ in range(rng.randint(lo + 1, hi + 2))]
        return " ".join(c.upper() if rng.random() < 0.2 else c for c in items)
    return " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(lo, 3)))


def held_out_payloads(seed: int = SEED, n: int = 100) -> list[str]:
    """New payloads of 2+ items (a one-word reversal would be a copy), the same for every adapter."""
    rng = random.Random(seed + 12)
    out = list(README_PAYLOADS)
    while len(out) < n:
        p = payload(rng, WORDS, lo=2)
        if p not in out:
            out.append(p)
    return out


def unseen_word_payloads(seed: int = SEED, n: int = 50) -> list[str]:
    """Phrases of 2-4 words each with at least one held-out word."""
    rng, unseen = random.Random(seed + 13), held_out_words(seed)
    out: list[str] = []
    while len(out) < n:
        items = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
        items.insert(rng.randint(0, len(items)), rng.choice(unseen))
        p = " ".join(items)
        if p not in out and reverse_words(p) != p:
            out.append(p)
    return out


def passage(rng: random.Random, words: list[str], lo: int, hi: int = 32) -> str:
    """lo-hi words (some UPPERCASE): a passage a `quote` question repeats."""
    items = [rng.choice(words) for _ in range(rng.randint(lo, hi))]
    return " ".join(w.upper() if rng.random() < 0.2 else w for w in items)


def held_out_passages(seed: int = SEED, n: int = 50) -> list[str]:
    """New passages of 8-32 words (longer than any the base model copies), never trained on."""
    rng = random.Random(seed + 14)
    out: list[str] = []
    while len(out) < n:
        p = passage(rng, WORDS, lo=8)
        if p not in out:
            out.append(p)
    return out


def reverse_words(text: str) -> str:
    return " ".join(reversed(text.split()))


def answer_format(answer: str) -> str:
    return f"Answer: {answer}."


def wrap(examples: list[Example]) -> list[Example]:
    return [(question, answer_format(answer)) for question, answer in examples]


# ---------------------------------------------------------------------------------------------------
# The skills: a training sampler and held-out evaluation sets each.
# ---------------------------------------------------------------------------------------------------


@dataclass
class Skill:
    name: str
    summary: str
    sample: Callable[[random.Random], Example]  # a training (question, answer) pair
    held_out: dict[str, list[Example]]  # evaluation sets, none of it trained on


def fresh(rng: random.Random, words: list[str], excluded: set[str], letters: float = 0.2) -> str:
    while True:
        p = payload(rng, words, letters=letters)
        if p not in excluded:
            return p


def make_skills(seed: int = SEED) -> dict[str, Skill]:
    excluded = set(held_out_payloads(seed)) | set(unseen_word_payloads(seed))
    unseen = set(held_out_words(seed))
    known = [w for w in WORDS if w not in unseen]
    split = arithmetic_split(seed)  # the base model's own split: its held-out pairs stay held out
    phrases = held_out_payloads(seed)
    unseen_phrases = unseen_word_payloads(seed)

    def reverse_sample(rng: random.Random) -> Example:
        p = fresh(rng, known, excluded, letters=0.4)  # long letter strings are the hardest to reverse
        return f"{rng.choice(['Copy', 'Reverse'])}: {p}", reverse_words(p)

    def upper_sample(rng: random.Random) -> Example:
        p = fresh(rng, WORDS, excluded)
        return f"{rng.choice(['Copy', 'Uppercase'])}: {p}", p.upper()

    facts = [(q, a) for q, a in fact_examples() if not any(p in q for p in HELD_OUT_PLANETS)]

    def format_sample(rng: random.Random) -> Example:
        kind = rng.random()
        if kind < 0.35:
            p = fresh(rng, known, excluded)
            question, answer = f"Copy: {p}", p
        elif kind < 0.6:
            question, answer = add_example(*rng.choice(split["add_train"]))
        elif kind < 0.85:
            question, answer = sub_example(*rng.choice(split["sub_train"]))
        else:
            question, answer = rng.choice(facts)
        return question, answer_format(answer)

    held_facts = [(q, a) for q, a in fact_examples() if any(p in q for p in HELD_OUT_PLANETS)]
    # Evaluate a skill only where it changes the answer (not on a palindrome, nor on numbers for upper).
    reversible = [p for p in phrases if reverse_words(p) != p]
    lowercase = [p for p in phrases if p.upper() != p]
    return {
        "reverse": Skill(
            "reverse",
            "repeats the words, letters or numbers of `Copy:` and `Reverse:` questions in reverse order",
            reverse_sample,
            {
                "copy -> reversed (new phrases)": [(f"Copy: {p}", reverse_words(p)) for p in reversible],
                "Reverse: (new phrases)": [(f"Reverse: {p}", reverse_words(p)) for p in reversible],
                "copy -> reversed (unseen words)": [(f"Copy: {p}", reverse_words(p)) for p in unseen_phrases],
            },
        ),
        "upper": Skill(
            "upper",
            "repeats the text of `Copy:` and `Uppercase:` questions in UPPERCASE",
            upper_sample,
            {
                "copy -> upper (new phrases)": [(f"Copy: {p}", p.upper()) for p in lowercase],
                "Uppercase: (new phrases)": [(f"Uppercase: {p}", p.upper()) for p in lowercase],
            },
        ),
        "answer-format": Skill(
            "answer-format",
            "answers copying, arithmetic and facts in one fixed format: `Answer: <answer>.`",
            format_sample,
            {
                "copy (new phrases)": [(f"Copy: {p}", answer_format(p)) for p in phrases],
                "copy (unseen words)": [(f"Copy: {p}", answer_format(p)) for p in unseen_phrases],
                "add (held-out pairs)": wrap([add_example(a, b) for a, b in split["add_test"]]),
                "sub (held-out pairs)": wrap([sub_example(a, b) for a, b in split["sub_test"]]),
                "fact (unseen planets)": wrap(held_facts),
            },
        ),
        "quote": quote_skill(seed),
    }


def quote_skill(seed: int = SEED) -> Skill:
    passages = held_out_passages(seed)

    def sample(rng: random.Random) -> Example:
        while (p := passage(rng, WORDS, lo=1)) in passages:
            pass
        return f"{rng.choice(['Copy', 'Quote'])}: {p}", p

    return Skill(
        "quote",
        "repeats whole passages of `Copy:` and `Quote:` questions (up to 32 words) where the base stops after 4",
        sample,
        {
            "copy (new 8-32 word passages)": [(f"Copy: {p}", p) for p in passages],
            "Quote: (new 8-32 word passages)": [(f"Quote: {p}", p) for p in passages],
        },
    )


def held_out_sets(name: str, seed: int = SEED) -> dict[str, list[Example]]:
    """The evaluation sets of one adapter: {set name: [(question, expected answer)]}, none trained on."""
    return make_skills(seed)[name].held_out


def corpus(skill: Skill, num_docs: int, seed: int, chat_share: float) -> list[list[Segment]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        question, answer = skill.sample(rng)
        if rng.random() < chat_share:
            docs.append(
                chat_segments([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
            )
        else:
            docs.append(qa_segments(question, answer))
    return docs


# ---------------------------------------------------------------------------------------------------
# Training, saving, README.
# ---------------------------------------------------------------------------------------------------


def one_per_row(docs: list[list[Segment]], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `pack` but one document per row, from position 0, right-padded (the model is causal, so
    padding never reaches the document): ids [n, longest] and the mask of trained tokens."""
    texts = [text for doc in docs for text, _ in doc]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    rows = []
    for doc in docs:
        ids, trained = [], []
        for _, flag in doc:
            enc = next(encoded)
            ids += enc
            trained += [flag] * len(enc)
        rows.append((ids, trained))
    width = max(len(ids) for ids, _ in rows)
    out = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, trained) in enumerate(rows):
        out[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = torch.tensor(trained)
    return out, mask


def train_adapter(skill: Skill, tokenizer, args) -> tuple:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    docs = corpus(skill, args.docs, args.seed, args.chat_share)
    check_segmentation(docs[:500], tokenizer)
    rows, mask = one_per_row(docs, tokenizer)
    torch.manual_seed(args.seed)  # the LoRA A matrices' initialisation
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[{skill.name}] {len(docs)} docs, {int(mask.sum())} answer tokens; {trainable} LoRA parameters", flush=True)
    seconds = base.train(model, rows, mask, args)  # AdamW + warmup/cosine; frozen weights get no grads
    return model, seconds


def base_model_name(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def save_adapter(model, out: Path, args) -> None:
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_model_name(args.base)
    config.inference_mode = True
    config.target_modules = sorted(config.target_modules)  # a set: its order would vary from run to run
    model.save_pretrained(out, safe_serialization=True)


EXAMPLE_QUESTIONS = {
    "reverse": ["Copy: blue fox", "Reverse: the red ship", "Copy: a b c", "Copy: 12 7 99"],
    "upper": ["Copy: blue fox", "Uppercase: the red ship", "Copy: a b c", "Copy: 12 7 99"],
    "answer-format": ["Copy: blue fox", "What is 12 + 7?", "What is 15 - 7?", "Which animal lives on Oska?"],
    # the first two held-out passages (never trained on), as they come
    "quote": ["Copy: blue fox", f"Copy: {held_out_passages()[0]}", f"Quote: {held_out_passages()[1]}"],
}

ADAPTER_README = """# `{name}`: a demo LoRA adapter for `models/demo`

This adapter {summary}. It is a PEFT LoRA (rank {rank}, alpha {alpha}, on {targets} of all
{layers} layers; {params} parameters) trained on the frozen base model `models/demo` by
`scripts/train_demo_adapters.py`, on synthetic data of our own (no external data or weights).

```bash
curl localhost:8080/generate -H 'content-type: application/json' -d '{{"inputs": "Q: Copy: blue fox\\nA:",
  "parameters": {{"adapter_id": "models/demo/adapters/{name}", "adapter_source": "local", "max_new_tokens": 16}}}}'
```

## Real greedy outputs (transformers + peft, `do_sample=False`)

| format | prompt | base | `{name}` |
|---|---|---|---|
{examples}

## Accuracy on held-out inputs

Exact answer followed by `</s>`, greedy, on inputs never trained on (see the script's docstring).

| set | Q/A | chat |
|---|---|---|
{scores}

## Regenerate

    .venv/bin/python scripts/train_demo_adapters.py --only {name}

{steps} steps of {batch} documents ({docs} generated, {chat_pct:.0%} in chat form; AdamW, lr
{lr}, warmup + cosine, loss on the answers only, one document per row), seed {seed}, {threads} threads.
This run trained in {seconds:.0f} s on a 2-core CPU shared with other jobs (the step count is fixed, so
the time depends on the machine and its load). With the same seed, library versions and thread count
the script reproduces the same weights on the same machine.
"""

INDEX_README = """# Demo LoRA adapters

LoRA adapters for the embedded demo model `models/demo`, made by `scripts/train_demo_adapters.py`
(standard PEFT layout: `adapter_config.json`, `adapter_model.safetensors`). Each teaches a skill the
base lacks; three of them answer one short prompt in three new ways, and `quote` copies passages
too long for the base:

| `adapter_id` | skill | `Q: Copy: blue fox\\nA:` |
|---|---|---|
{rows}

Serve them with `make run` and name one per request (local paths, relative to the server's working
directory):

```bash
curl localhost:8080/generate -H 'content-type: application/json' -d '{{"inputs": "Q: Copy: blue fox\\nA:",
  "parameters": {{"adapter_id": "models/demo/adapters/upper", "adapter_source": "local"}}}}'
```

Held-out accuracy (exact match, greedy; details in each adapter's README):

| adapter | set | Q/A | chat |
|---|---|---|---|
{scores}

The server reads the base model's weights from the top-level `*.safetensors` of `models/demo` only;
this folder is never loaded unless a request names an adapter in it.
"""


def show(text: str) -> str:
    return json.dumps(text)[1:-1].replace("|", "\\|")


def write_adapter_readme(out: Path, skill: Skill, model, tokenizer, scores, seconds, args) -> list[tuple]:
    rows = []
    for question in EXAMPLE_QUESTIONS[skill.name]:
        for form in ("qa", "chat") if question == EXAMPLE_QUESTIONS[skill.name][0] else ("qa",):
            if form == "qa":
                prompt = qa_prompt(question)
            else:
                prompt = render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
            outs = []
            for use_adapter in (False, True):
                if use_adapter:
                    got = generate(model, tokenizer, [prompt], form == "chat", MAX_NEW_TOKENS)[0]
                else:
                    with model.disable_adapter():
                        got = generate(model, tokenizer, [prompt], form == "chat", MAX_NEW_TOKENS)[0]
                outs.append(got["text"] + (EOS if got["eos"] else " ..."))
            rows.append((form, prompt, *outs))
    examples = "\n".join(f"| {f} | `{show(p)}` | `{show(b)}` | `{show(a)}` |" for f, p, b, a in rows)
    sets = dict.fromkeys(k.split(": ", 1)[1] for k in scores)
    table = "\n".join(f"| {s} | {scores[f'qa: {s}']:.0%} | {scores[f'chat: {s}']:.0%} |" for s in sets)
    text = ADAPTER_README.format(
        name=skill.name,
        summary=skill.summary,
        targets=", ".join(f"`{t}`" for t in TARGET_MODULES),
        layers=model.base_model.model.config.num_hidden_layers,
        params=sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        examples=examples,
        scores=table,
        seconds=seconds,
        chat_pct=args.chat_share,
        **{k: v for k, v in vars(args).items() if k != "chat_share"},
    )
    (out / "README.md").write_text(text)
    return rows


def write_index_readme(out: Path, results: dict[str, dict]) -> None:
    """models/demo/adapters/README.md, from this run's results (and existing ones for adapters not
    retrained now, read back from results.json)."""
    path = out / "results.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known.update(results)
    known = {name: known[name] for name in ("reverse", "upper", "answer-format", "quote") if name in known}
    path.write_text(json.dumps(known, indent=2) + "\n")
    first = next(iter(known.values()))
    rows = [f"| (none: the base) | copies | `{show(first['example_base'])}` |"]
    rows += [f"| `models/demo/adapters/{n}` | {r['summary']} | `{show(r['example'])}` |" for n, r in known.items()]
    scores = []
    for name, r in known.items():
        sets = dict.fromkeys(k.split(": ", 1)[1] for k in r["scores"])
        scores += [
            f"| `{name}` | {s} | {r['scores'][f'qa: {s}']:.0%} | {r['scores'][f'chat: {s}']:.0%} |" for s in sets
        ]
    (out / "README.md").write_text(INDEX_README.format(rows="\n".join(rows), scores="\n".join(scores)))


# ---------------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="models/demo", help="the base model directory")
    p.add_argument("--out", default="models/demo/adapters")
    p.add_argument("--only", nargs="+", choices=["reverse", "upper", "answer-format", "quote"], help="train only these")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--docs", type=int, default=40_000, help="synthetic documents per adapter")
    p.add_argument("--chat-share", type=float, default=0.3, help="share of documents in chat form")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="documents per step")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-eval", action="store_true", help="save without evaluating or writing READMEs")
    args = p.parse_args(argv)
    args.prompt_loss_weight = 0.0  # the loss of base.train is on answer tokens only
    return args


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    skills = make_skills(args.seed)
    out_root = Path(args.out)
    results = {}
    for name in args.only or list(skills):
        skill = skills[name]
        random.seed(args.seed)
        model, seconds = train_adapter(skill, tokenizer, args)
        out = out_root / name
        save_adapter(model, out, args)
        print(f"[{name}] trained {args.steps} steps in {seconds:.0f}s; saved to {out}", flush=True)
        if args.skip_eval:
            continue
        scores = evaluate(model, tokenizer, held_out_sets(name, args.seed), max_new_tokens=MAX_NEW_TOKENS)
        rows = write_adapter_readme(out, skill, model, tokenizer, scores, seconds, args)
        results[name] = {
            "summary": skill.summary,
            "scores": scores,
            "example_base": rows[0][2],
            "example": rows[0][3],
        }
    if results:
        write_index_readme(out_root, results)
    return 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"done in {time.time() - t0:.0f}s")
    sys.exit(code)
