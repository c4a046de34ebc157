#!/usr/bin/env python
"""Train Medusa heads for the embedded demo model (`models/demo/adapters/medusa/`), reproducibly.

    .venv/bin/python scripts/train_demo_medusa.py [--heads 3] [--steps 400]

Self-distillation, as Medusa trains its heads: the frozen base model continues demo prompts (few-shot
Q/A in the base's own formats) greedily, and head i learns to guess, from the final hidden state at a
position, the token the base itself produced i + 2 places later. The heads are LoRAX's version 2
layout (one residual block x + silu(W x + b) each, then the base model's own LM head), so the adapter
can be the server's default adapter or be named per request; it only changes how many tokens a
decode step drafts (`--speculative-tokens`), never the answers.

`train_medusa` is also what the tests call, on their tiny random models.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"


@torch.no_grad()
def continuations(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:  # noqa: ANN001
    """Each prompt followed by the model's own greedy continuation (EOS does not stop it)."""
    out = []
    for first in range(0, len(prompts), 32):
        group = prompts[first : first + 32]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(group):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)  # fmt: skip
        out += [p + full[row, width:].tolist() for row, p in enumerate(group)]
    return out


@torch.no_grad()
def training_pairs(model, sequences: list[list[int]], heads: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(final hidden states [n, hidden], targets [n, heads]): for each position with `heads` + 1 tokens
    after it, its hidden state and the tokens 2 .. heads + 1 places later."""
    xs, ys = [], []
    for seq in sequences:
        ids = torch.tensor([seq])
        hidden = model.model(input_ids=ids).last_hidden_state[0]  # after the final norm
        n = len(seq) - heads - 1
        if n <= 0:
            continue
        xs.append(hidden[:n])
        ys.append(torch.stack([torch.tensor(seq[2 + i : 2 + i + n]) for i in range(heads)], 1))
    return torch.cat(xs), torch.cat(ys)


def train_medusa(
    model_dir: Path,
    out_dir: Path,
    prompts: list[list[int]],
    heads: int = 3,
    steps: int = 400,
    new_tokens: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Train version-2 Medusa heads for the model at `model_dir` on its own continuations of `prompts`
    and write them as a LoRAX Medusa adapter to `out_dir`; returns each head's top-1 accuracy on the
    training positions."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    x, y = training_pairs(model, continuations(model, prompts, new_tokens, pad), heads)
    size = x.shape[1]
    weight = torch.zeros(heads, size, size, requires_grad=True)  # zero: every head starts as the LM head
    bias = torch.zeros(heads, size, requires_grad=True)
    lm_head = model.get_output_embeddings().weight.detach()
    optimizer = torch.optim.Adam([weight, bias], lr=3e-3)
    generator = torch.Generator().manual_seed(seed)

    def guesses(rows: torch.Tensor) -> torch.Tensor:  # [n, heads, vocab]
        h = x[rows][:, None, :] + F.silu(torch.einsum("nh,kgh->nkg", x[rows], weight) + bias)
        return h @ lm_head.T

    for _ in range(steps):
        rows = torch.randint(0, len(x), (256,), generator=generator)
        loss = F.cross_entropy(guesses(rows).flatten(0, 1), y[rows].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        every = torch.arange(len(x))
        accuracy = (guesses(every).argmax(-1) == y).float().mean(0).tolist()
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(heads):
        tensors[f"{i}.0.linear.weight"] = weight[i].detach().contiguous()
        tensors[f"{i}.0.linear.bias"] = bias[i].detach().contiguous()
    save_file(tensors, str(out_dir / "medusa_lm_head.safetensors"))
    config = {"medusa_num_heads": heads, "medusa_num_layers": 1, "version": 2,
              "base_model_name_or_path": str(model_dir)}  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {f"head {i} (+{i + 2})": a for i, a in enumerate(accuracy)}


def demo_prompts(n: int, seed: int = 7) -> list[list[int]]:
    """Few-shot Q/A prompts of the demo's tasks, tokenized."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_data import arithmetic_split, make_task_sampler

    sample = make_task_sampler(arithmetic_split())
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    prompts = []
    for _ in range(n):
        shots = [sample(rng) for _ in range(rng.randint(1, 6))]
        text = "".join(f"Q: {q}\nA: {a}\n" for q, a in shots[:-1]) + f"Q: {shots[-1][0]}\nA:"
        prompts.append(tokenizer(text)["input_ids"])
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--out", type=Path, default=DEMO / "adapters" / "medusa")
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible sums
    accuracy = train_medusa(DEMO, args.out, demo_prompts(args.prompts), args.heads, args.steps)
    config = json.loads((args.out / "config.json").read_text())
    config["base_model_name_or_path"] = "models/demo"
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, value in accuracy.items():
        print(f"{name}: {value:.1%} top-1 on its training positions")


if __name__ == "__main__":
    main()
