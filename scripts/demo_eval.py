"""How the demo model is judged and shown (the evaluation half of `train_demo.py`): greedy generation
with transformers, exact-match accuracy on held-out prompts, and the model directory's README.md with
real outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from demo_data import (
    EOS,
    PLANETS,
    SEED,
    WORDS,
    Example,
    add_example,
    copy_example,
    fact_examples,
    greeting_examples,
    qa_prompt,
    render_chat,
    sub_example,
)

# ---------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], chat: bool = False, max_new_tokens: int = 16) -> list[dict]:
    """Greedy generation; returns per prompt its decoded text and whether it stopped at EOS."""
    results = []
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), 32):
        chunk = prompts[i : i + 32]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not chat)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            stopped = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            results.append({"text": tokenizer.decode(row, skip_special_tokens=True), "eos": stopped})
    return results


def eval_sets(split: dict[str, list], seed: int = SEED) -> dict[str, list[Example]]:
    """Held-out arithmetic pairs, fresh copy payloads, the world's facts (memorised), greetings."""
    rng = random.Random(seed + 1)
    return {
        "add (held-out)": [add_example(a, b) for a, b in split["add_test"]],
        "sub (held-out)": [sub_example(a, b) for a, b in split["sub_test"]],
        "copy (new)": [copy_example(rng) for _ in range(100)],
        "fact": fact_examples(),
        "greeting": greeting_examples(),
    }


def evaluate(
    model, tokenizer, sets: dict[str, list[Example]], chat_fn=None, max_new_tokens: int = 16
) -> dict[str, float]:
    """Exact-match accuracy (answer then EOS within `max_new_tokens`) per task, in Q/A and chat form."""
    scores = {}
    for form in ("qa", "chat"):
        for name, examples in sets.items():
            if form == "qa":
                prompts = [qa_prompt(q) for q, _ in examples]
            else:
                prompts = [render_chat([{"role": "user", "content": q}], True) for q, _ in examples]
            expect = [" " + a for _, a in examples]  # both formats answer after a space
            got = generate(model, tokenizer, prompts, chat=form == "chat", max_new_tokens=max_new_tokens)
            ok = [g["eos"] and g["text"] == e for g, e in zip(got, expect, strict=True)]
            scores[f"{form}: {name}"] = sum(ok) / len(ok)
            bad = [(p, g["text"]) for p, g, k in zip(prompts, got, ok, strict=True) if not k][:2]
            print(f"{form:4s} {name:16s} {sum(ok):4d}/{len(ok):<4d} {100 * sum(ok) / len(ok):5.1f}%  {bad}")
    return scores


# ---------------------------------------------------------------------------------------------------
# README.md of the model directory, with real greedy outputs and the accuracy table.
# ---------------------------------------------------------------------------------------------------

README_EXAMPLES = [  # (format, question): shown with the model's real greedy output
    ("qa", "What is 2 + 3?"),
    ("qa", "Copy: blue fox"),
    ("qa", "What colour is the sky on Zorb?"),
    ("chat", "What is the capital of Mirra?"),
    ("chat", "Who are you?"),
    ("qa", "Reverse: blue fox"),  # a skill the base lacks: left for an adapter
]

README = """# Demo model

The embedded default model of this server (`make run` serves it): a {params:.1f}M-parameter
`LlamaForCausalLM` (hidden {hidden}, {layers} layers, {heads} heads / {kv_heads} KV heads,
MLP {intermediate}, vocab {vocab}, tied embeddings, float32) with its own byte-level BPE tokenizer
and chat template. `scripts/train_demo.py` trains both from scratch on CPU on synthetic data that
the script generates. The model knows a few narrow tasks and nothing else: it exists for demos and
tests.

## Prompt formats

Q/A, for `/generate`: the prompt is `Q: <question>\\nA:` (no trailing space); the model answers with a
space, the answer, and `</s>`. The tokenizer prepends `<s>` as Llama's does.

Chat, for `/v1/chat/completions`: the chat template in `tokenizer_config.json` renders

    <s><|system|> You are a helpful assistant.\\n<|user|> What is 2 + 3?\\n<|assistant|> 5</s>

(system message optional; a space follows every role marker, so answers are the same tokens as in
the Q/A format, and the generated text starts with that space: ` 5`). The rendered text already starts
with `<s>`: tokenize it without adding special tokens again.

Special tokens: `<unk>` 0, `<s>` 1, `</s>` 2 (EOS), `<pad>` 3, `<|system|>` 4, `<|user|>` 5,
`<|assistant|>` 6; `<|reserved_N|>` tokens pad the vocabulary to a multiple of 64.

Tasks:
- `What is a + b?` and `What is a - b?`, operands 0-20 (a >= b);
- `Copy: <text>` repeats 1-4 words (from a fixed list of {num_words}, some in UPPERCASE), 2-6 single
  letters, or 1-3 numbers 0-99;
- four facts about each of 8 invented planets: `What colour is the sky on Zorb?`,
  `How many moons does Zorb have?`, `Which animal lives on Zorb?`, `What is the capital of Zorb?`
  (planets: {planets});
- greetings: `Hello`, `Hi`, `Who are you?`, `What is your name?`, `Thank you`.

## Real greedy outputs (transformers, `do_sample=False`)

| format | prompt | output |
|---|---|---|
{examples}

The last row is a skill the base model lacks on purpose. The base never sees a task that reverses,
uppercases, or reformats: those are left for the demo LoRA adapters, which can use the same Q/A format
and the data helpers in `scripts/train_demo.py` (`qa_segments`, `chat_segments`, `pack`, `train`,
`evaluate`, `WORDS`, `PLANETS`). The tokenizer already has tokens for the UPPERCASE words and single
letters.

## Accuracy on held-out prompts

Exact answer followed by `</s>`, greedy. Arithmetic: pairs never seen in training (drawn among those
with both operands >= 5). Copy: new random payloads. Facts and greetings: the trained set itself (there
is nothing to generalise to).

| task | Q/A | chat |
|---|---|---|
{scores}

## Regenerate

    .venv/bin/python scripts/train_demo.py --out models/demo

{steps} steps of {batch} x {block} packed tokens (AdamW, lr {lr}, warmup + cosine, loss weight {plw} on
prompt tokens and 1 on answers), seed {seed}, {threads} threads. This run trained in {minutes:.1f} min on
a 2-core CPU (the step count is fixed, so the time depends on the machine and its load). The
script is the recipe: with the same seed, library versions and thread count it reproduces the same
files on the same machine, but bit-exact weights across machines, CPU types or library versions are
not guaranteed (floating-point reduction order differs).

## License

Everything here is generated by `scripts/train_demo.py`: the training data is our own synthetic text,
with no external data or weights. It is under the same license as the rest of this repository.
"""


def readme_examples(model, tokenizer) -> str:
    rows = []
    for form, question in README_EXAMPLES:
        if form == "qa":
            prompt = qa_prompt(question)
        else:
            prompt = render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        got = generate(model, tokenizer, [prompt], chat=form == "chat")[0]
        output = got["text"] + (EOS if got["eos"] else " ...")
        cells = [json.dumps(text)[1:-1].replace("|", "\\|") for text in (prompt, output)]
        rows.append(f"| {form} | `{cells[0]}` | `{cells[1]}` |")
    return "\n".join(rows)


def write_readme(out: Path, model, tokenizer, scores: dict[str, float], seconds: float, args) -> None:
    tasks = dict.fromkeys(name.split(": ", 1)[1] for name in scores)
    table = "\n".join(f"| {task} | {scores[f'qa: {task}']:.0%} | {scores[f'chat: {task}']:.0%} |" for task in tasks)
    text = README.format(
        params=sum(p.numel() for p in model.parameters()) / 1e6,
        vocab=len(tokenizer),
        num_words=len(WORDS),
        planets=", ".join(PLANETS),
        examples=readme_examples(model, tokenizer),
        scores=table,
        minutes=seconds / 60,
        plw=args.prompt_loss_weight,
        **{k: v for k, v in vars(args).items() if k not in ("prompt_loss_weight", "vocab")},
    )
    (out / "README.md").write_text(text)
