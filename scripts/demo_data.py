"""What the demo model learns (the data half of `train_demo.py`): its special tokens and chat
template, the invented world and word lists, the task generators, the Q/A and chat formats, and the
seeded synthetic corpus. Adapter scripts reuse all of it with new task generators."""

from __future__ import annotations

import random
from collections.abc import Callable

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
