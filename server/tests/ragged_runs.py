"""Run our model and a transformers reference on the same prompts: a ragged prefill, then greedy
decode steps (ours: the whole batch at once through the paged KV cache; the reference: one prompt at a
time with `generate`)."""

from __future__ import annotations

import torch

from lorax_server.adapters.lora import segments_of
from lorax_server.forward import ForwardBatch
from lorax_server.kv_cache import BlockManager, KVCache

BLOCK = 4


def prompts(vocab: int, lengths: list[int], seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


@torch.no_grad()
def run_ours(
    model, prompts: list[torch.Tensor], steps: int, adapters: list[int] | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prefill logits of every prompt token ([len, vocab] per prompt) and the logits of `steps` greedy
    decode steps [batch, steps, vocab] (the first from the prefill), rows using `adapters` (0: base)."""
    c = model.config
    cache = KVCache(c.num_layers, 256, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, torch.device("cpu"))
    blocks = BlockManager(256, BLOCK)
    lengths = [len(p) for p in prompts]
    tables = [blocks.allocate(n + steps) for n in lengths]
    width = max(len(t) for t in tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    adapters = adapters or [0] * len(prompts)
    ids = torch.cat(prompts)
    meta = ForwardBatch.build(ids, lengths, lengths, tables, BLOCK, logits_index=torch.arange(len(ids)),
                              lora_segments=segments_of(adapters, lengths))  # fmt: skip
    prefill = list(model.forward(meta, cache).split(lengths))
    decoded = [torch.stack([p[-1] for p in prefill])]
    for _ in range(steps - 1):
        lengths = [n + 1 for n in lengths]
        ones = [1] * len(lengths)
        meta = ForwardBatch.build(decoded[-1].argmax(-1), ones, lengths, tables, BLOCK,
                                  lora_segments=segments_of(adapters, ones))  # fmt: skip
        decoded.append(model.forward(meta, cache))
    return prefill, torch.stack(decoded, dim=1)


@torch.no_grad()
def run_reference(ref, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The reference's prefill logits [len, vocab], greedy decode logits [steps, vocab] and tokens."""
    prefill = ref(prompt[None]).logits[0]
    out = ref.generate(
        prompt[None],
        attention_mask=torch.ones_like(prompt[None]),
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    return prefill, torch.stack(out.logits, 1)[0], out.sequences[0, len(prompt) :].tolist()


def assert_matches(
    ours: tuple[list[torch.Tensor], torch.Tensor], row: int, ref, prompt: torch.Tensor, tol: float = 1e-4
) -> None:
    """Row `row` of `run_ours` output equals the reference run alone on its prompt."""
    prefill, decoded = ours
    want_prefill, want_decoded, want_tokens = run_reference(ref, prompt, decoded.shape[1])
    assert (prefill[row] - want_prefill).abs().max() < tol, f"row {row}: prefill"
    assert (decoded[row] - want_decoded).abs().max() < tol, f"row {row}: decode"
    assert decoded[row].argmax(-1).tolist() == want_tokens, f"row {row}: greedy tokens"
