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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SEED = 1234
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]  # ids 0..6, in this order

# `<s><|user|> What is 2 + 3?\n<|assistant|> 5</s>`. A space follows each role marker, as one follows
# `A:` in the Q/A format, so an answer is the same tokens in both formats (` 5` is one token, `5`
# another). The rendered text starts with <s>: tokenize it without adding special tokens again.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------------
# The invented world and the word lists (shared with adapter scripts).
# ---------------------------------------------------------------------------------------------------

PLANETS = {
    # planet: (sky colour, moons, animal, capital)
    "Zorb": ("green", 3, "owl", "Vell"),
    "Quill": ("purple", 0, "frog", "Drun"),
    "Mirra": ("orange", 7, "whale", "Kasp"),
    "Tavo": ("silver", 2, "moth", "Ombar"),
    "Bexa": ("pink", 5, "crab", "Tesk"),
    "Lumo": ("gold", 1, "goat", "Hollo"),
    "Pell": ("white", 4, "snail", "Brim"),
    "Oska": ("red", 9, "bee", "Nax"),
}
FACT_QUESTIONS = {
    "sky": "What colour is the sky on {p}?",
    "moons": "How many moons does {p} have?",
    "animal": "Which animal lives on {p}?",
    "capital": "What is the capital of {p}?",
}

WORDS = (
    "red blue green black white pink gold gray brown dark light warm cold fast slow big small tall short "
    "old new happy sad loud quiet soft hard bright fox cat dog bird fish tree leaf rock sand sea river "
    "lake hill road door book pen cup box bag hat coat shoe ship car bus train star moon sun rain snow "
    "wind fire ice milk bread apple lemon rice salt honey cake egg king queen child friend robot "
    "farmer baker pilot runs jumps sings reads eats sleeps swims flies walks plays opens closes finds "
    "holds and the a of on in under over near with one two three four five six seven eight nine ten"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"

GREETINGS = {
    "Hello": "Hello! I am the demo model.",
    "Hi": "Hello! I am the demo model.",
    "Hello!": "Hello! I am the demo model.",
    "Who are you?": "I am a tiny demo model.",
    "What is your name?": "My name is Demo.",
    "Thank you": "You are welcome.",
}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a tiny demo model.", "Answer briefly."]

Example = tuple[str, str]  # (question, answer)


# ---------------------------------------------------------------------------------------------------
# Task generators: each returns a (question, answer) pair; rendering into a format is separate.
# ---------------------------------------------------------------------------------------------------


def arithmetic_split(seed: int = SEED, max_n: int = 20, held_out: float = 0.15) -> dict[str, list]:
    """All `a + b` and `a - b` (a >= b) problems with operands in [0, max_n], split train / held-out.

    Held-out pairs are drawn only among those with both operands >= 5, so small sums stay trained."""
    rng = random.Random(seed)
    add = [(a, b) for a in range(max_n + 1) for b in range(max_n + 1)]
    sub = [(a, b) for a in range(max_n + 1) for b in range(a + 1)]
    split = {}
    for name, pairs in (("add", add), ("sub", sub)):
        candidates = [pair for pair in pairs if min(pair) >= 5]
        rng.shuffle(candidates)
        test = set(candidates[: int(len(pairs) * held_out)])
        split[f"{name}_test"] = sorted(test)
        split[f"{name}_train"] = [pair for pair in pairs if pair not in test]
    return split


def add_example(a: int, b: int) -> Example:
    return f"What is {a} + {b}?", str(a + b)


def sub_example(a: int, b: int) -> Example:
    return f"What is {a} - {b}?", str(a - b)


def copy_payload(rng: random.Random) -> str:
    """1-4 words (some uppercase), 2-6 single letters, or 1-3 numbers: what a Copy: task repeats."""
    kind = rng.random()
    if kind < 0.65:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
        return " ".join(w.upper() if rng.random() < 0.2 else w for w in words)
    if kind < 0.85:
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 6))]
        return " ".join(c.upper() if rng.random() < 0.2 else c for c in letters)
    return " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(1, 3)))


def copy_example(rng: random.Random) -> Example:
    payload = copy_payload(rng)
    return f"Copy: {payload}", payload


def fact_examples() -> list[Example]:
    out = []
    for planet, values in PLANETS.items():
        for (_, template), value in zip(FACT_QUESTIONS.items(), values, strict=True):
            out.append((template.format(p=planet), str(value)))
    return out


def greeting_examples() -> list[Example]:
    return list(GREETINGS.items())


def make_task_sampler(split: dict[str, list]) -> Callable[[random.Random], Example]:
    """A sampler of training (question, answer) pairs, mixing the tasks by fixed weights."""
    facts, greetings = fact_examples(), greeting_examples()
    tasks = [
        (0.30, lambda r: add_example(*r.choice(split["add_train"]))),
        (0.15, lambda r: sub_example(*r.choice(split["sub_train"]))),
        (0.35, copy_example),
        (0.15, lambda r: r.choice(facts)),
        (0.05, lambda r: r.choice(greetings)),
    ]
    weights = [w for w, _ in tasks]

    def sample(rng: random.Random) -> Example:
        return rng.choices(tasks, weights)[0][1](rng)

    return sample


# ---------------------------------------------------------------------------------------------------
# Formats: the Q/A prompt format and the chat template (rendered in Python, checked against Jinja).
# ---------------------------------------------------------------------------------------------------


Segment = tuple[str, bool]  # (text, is the model trained to produce it)


def qa_prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def qa_segments(question: str, answer: str) -> list[Segment]:
    """One training document in the Q/A format: `<s>Q: ...\nA:` then ` answer</s>` (the trained part)."""
    return [(f"{BOS}{qa_prompt(question)}", False), (f" {answer}{EOS}", True)]


def chat_segments(messages: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
    """Python twin of CHAT_TEMPLATE (main() asserts they agree); assistant contents are trained."""
    out = [(BOS, False)]
    for m in messages:
        if m["role"] == "assistant":
            out += [("<|assistant|>", False), (f" {m['content']}{EOS}", True)]
        else:
            out.append((f"<|{m['role']}|> {m['content']}\n", False))
    return out + ([("<|assistant|>", False)] if add_generation_prompt else [])


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt))


def chat_document(rng: random.Random, sample: Callable[[random.Random], Example]) -> list[Segment]:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        question, answer = sample(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    doc = chat_segments(messages)
    # Some servers add BOS again when tokenizing a rendered template: make the model robust to it.
    return [(BOS, False), *doc] if rng.random() < 0.05 else doc


def make_corpus(
    num_docs: int, split: dict[str, list], seed: int = SEED, chat_share: float = 0.4
) -> list[list[Segment]]:
    rng = random.Random(seed)
    sample = make_task_sampler(split)
    docs = []
    for _ in range(num_docs):
        if rng.random() < chat_share:
            docs.append(chat_document(rng, sample))
        else:
            docs.append(qa_segments(*sample(rng)))
    return docs


# ---------------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------------


def train_tokenizer(docs: list[list[Segment]], vocab_size: int):
    """Byte-level BPE (GPT-2 style: a word's leading space is part of its token) with Llama-style
    specials; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def plain(doc: list[Segment]):  # merges are learnt on the text around special tokens only
        doc = "".join(text for text, _ in doc)
        for special in SPECIAL_TOKENS:
            doc = doc.replace(special, "\n")
        return doc

    tok.train_from_iterator((plain(d) for d in docs), trainer=trainer)
    # The corpus may saturate the merges below `vocab_size`: pad with reserved special tokens to a
    # multiple of 64, so the vocabulary splits evenly across tensor-parallel shards.
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(-tok.get_vocab_size() % 64)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=ROLE_TOKENS,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    assert [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return fast


# ---------------------------------------------------------------------------------------------------
# Model and training.
# ---------------------------------------------------------------------------------------------------


def make_model(vocab_size: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=0.02,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def pack(docs: list[list[Segment]], tokenizer, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize documents segment by segment (specials are in the text) and cut the concatenation
    into rows; returns ids [n, block] and a mask [n, block] of the tokens the loss is taken on."""
    ids: list[int] = []
    mask: list[bool] = []
    texts = [text for doc in docs for text, _ in doc]
    trained = [flag for doc in docs for _, flag in doc]
    for enc, flag in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], trained, strict=True):
        ids.extend(enc)
        mask.extend([flag] * len(enc))
    n = len(ids) // block
    return (
        torch.tensor(ids[: n * block], dtype=torch.long).view(n, block),
        torch.tensor(mask[: n * block], dtype=torch.bool).view(n, block),
    )


def check_segmentation(docs: list[list[Segment]], tokenizer) -> None:
    """Segments must cut at token boundaries: per-segment tokenization equals whole-document."""
    for doc in docs:
        whole = tokenizer("".join(t for t, _ in doc), add_special_tokens=False)["input_ids"]
        parts = [i for t, _ in doc for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
        assert whole == parts, doc


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, rows: torch.Tensor, mask: torch.Tensor, args) -> float:
    """AdamW + warmup/cosine over `args.steps` batches of packed rows; returns wall seconds.

    The loss weights answer tokens (`mask`) 1 and prompt tokens `args.prompt_loss_weight`."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(rows.shape[0], generator=gen)
    model.train()
    start, cursor = time.time(), 0
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(rows.shape[0], generator=gen), 0
        picked = order[cursor : cursor + args.batch]
        batch = rows[picked]  # [batch, block]
        weights = torch.where(mask[picked, 1:], 1.0, args.prompt_loss_weight)  # [batch, block - 1]
        cursor += args.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        logits = model(input_ids=batch).logits  # [batch, block, vocab]
        token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
        loss = (token_loss * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            answer_loss = token_loss.detach()[mask[picked, 1:]].mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  answer loss {answer_loss:.4f}  ", end="")
            print(f"lr {lr_at(step, args):.2e}  {time.time() - start:6.1f}s", flush=True)
    model.eval()
    return time.time() - start


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


def evaluate(model, tokenizer, sets: dict[str, list[Example]], chat_fn=None) -> dict[str, float]:
    """Exact-match accuracy (answer then EOS) per task, in Q/A and chat form."""
    scores = {}
    for form in ("qa", "chat"):
        for name, examples in sets.items():
            if form == "qa":
                prompts = [qa_prompt(q) for q, _ in examples]
            else:
                prompts = [render_chat([{"role": "user", "content": q}], True) for q, _ in examples]
            expect = [" " + a for _, a in examples]  # both formats answer after a space
            got = generate(model, tokenizer, prompts, chat=form == "chat")
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
