"""Our logits and greedy tokens equal transformers' on tiny random Llama (GQA) and Mistral (sliding
window shorter than the sequences), float32, for ragged batches — prefill and decode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorax_server.forward import ForwardBatch
from lorax_server.kv_cache import BlockManager, KVCache
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model

BLOCK = 4  # small blocks so sequences span many of them
LENGTHS = [7, 3, 12, 1, 9]  # ragged, longer than Mistral's window of 6
DECODE_STEPS = 16
TOL = 1e-4


@pytest.fixture(scope="module", params=["llama_dir", "mistral_dir"])
def models(request: pytest.FixtureRequest):
    model_dir = request.getfixturevalue(request.param)
    ours = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return ours, ref


def _prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]


def _cache(model, num_blocks: int = 128) -> tuple[KVCache, BlockManager]:
    c = model.config
    return (
        KVCache(c.num_layers, num_blocks, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, torch.device("cpu")),
        BlockManager(num_blocks, BLOCK),
    )


def _tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables])


@torch.no_grad()
def test_prefill_logits_match_every_position(models) -> None:
    ours, ref = models
    prompts = _prompts(ours.config.vocab_size)
    cache, blocks = _cache(ours)
    tables = _tables([blocks.allocate(len(p)) for p in prompts])
    ids = torch.cat(prompts)
    meta = ForwardBatch.build(ids, LENGTHS, LENGTHS, tables, BLOCK, logits_index=torch.arange(len(ids)))
    got = ours.forward(meta, cache)
    want = torch.cat([ref(p[None]).logits[0] for p in prompts])
    assert (got - want).abs().max().item() < TOL


@torch.no_grad()
def test_decode_logits_match_for_16_steps(models) -> None:
    """Prefill the ragged batch, then decode greedily; every step's logits equal transformers' logits
    for the same sequence (computed by its own incremental generate)."""
    ours, ref = models
    prompts = _prompts(ours.config.vocab_size)
    cache, blocks = _cache(ours)
    tables = _tables([blocks.allocate(len(p) + DECODE_STEPS) for p in prompts])
    meta = ForwardBatch.build(torch.cat(prompts), LENGTHS, LENGTHS, tables, BLOCK)
    logits = ours.forward(meta, cache)
    steps = [logits]
    lengths = list(LENGTHS)
    for _ in range(DECODE_STEPS - 1):
        next_ids = logits.argmax(-1)
        lengths = [n + 1 for n in lengths]
        meta = ForwardBatch.build(next_ids, [1] * len(lengths), lengths, tables, BLOCK)
        logits = ours.forward(meta, cache)
        steps.append(logits)
    got = torch.stack(steps, dim=1)  # [batch, steps, vocab]
    for row, prompt in enumerate(prompts):
        out = ref.generate(
            prompt[None],
            attention_mask=torch.ones_like(prompt[None]),
            max_new_tokens=DECODE_STEPS,
            min_new_tokens=DECODE_STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        want = torch.stack(out.logits, dim=1)[0]  # [steps, vocab]
        # min_new_tokens masks EOS in the processed scores only; raw logits are compared.
        assert (got[row] - want).abs().max().item() < TOL, f"row {row}"
        assert got[row].argmax(-1).tolist() == out.sequences[0, len(prompt) :].tolist()
