"""Each supported family, built tiny and random with transformers: prefill logits and 16 decode steps
equal transformers (float32, ragged batch), and two peft adapters in one mixed batch equal peft."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from families import FAMILIES, LORA_KWARGS
from peft import PeftModel
from ragged_runs import run_reference
from tiny_models import make_lora_adapter, make_model
from transformers import AutoModelForCausalLM

from lorax_server.adapters.lora import segments_of
from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.forward import ForwardBatch
from lorax_server.kv_cache import BlockManager, KVCache
from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.linear import Linear
from lorax_server.models.loader import load_model

BLOCK = 4
LENGTHS = [7, 3, 12, 5]
STEPS = 16


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    config_name, model_name, overrides, targets = FAMILIES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    base = make_model(getattr(transformers, config_name), getattr(transformers, model_name), tmp / "base", **overrides)
    adapters = [
        make_lora_adapter(
            base, tmp / f"lora{i}", i, r=4 * (i + 1), lora_alpha=8, target_modules=t, **LORA_KWARGS.get(model_name, {})
        )
        for i, t in enumerate(targets)
    ]
    ours = load_model(base, TorchAttention(BLOCK), torch.device("cpu"), "float32")
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return ours, ref, base, adapters


def _prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]


def _cache(model) -> KVCache:
    c = model.config
    return KVCache(c.num_layers, 128, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, torch.device("cpu"))


def _tables(blocks: BlockManager, sizes: list[int]) -> torch.Tensor:
    tables = [blocks.allocate(n) for n in sizes]
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables])


@torch.no_grad()
def test_prefill_and_decode_match_transformers(family) -> None:
    ours, ref, _, _ = family
    prompts = _prompts(ours.config.vocab_size)
    cache, blocks = _cache(ours), BlockManager(128, BLOCK)
    tables = _tables(blocks, [n + STEPS for n in LENGTHS])
    ids = torch.cat(prompts)
    meta = ForwardBatch.build(ids, LENGTHS, LENGTHS, tables, BLOCK, logits_index=torch.arange(len(ids)))
    got = ours.forward(meta, cache).split(LENGTHS)
    for p, logits in zip(prompts, got, strict=True):
        assert (logits - ref(p[None]).logits[0]).abs().max() < 1e-4
    last = torch.stack([g[-1] for g in got])
    steps, lengths = [last], list(LENGTHS)
    for _ in range(STEPS - 1):
        lengths = [n + 1 for n in lengths]
        meta = ForwardBatch.build(steps[-1].argmax(-1), [1] * len(lengths), lengths, tables, BLOCK)
        steps.append(ours.forward(meta, cache))
    decoded = torch.stack(steps, dim=1)  # [batch, steps, vocab]
    for row, p in enumerate(prompts):
        _, want_logits, want_tokens = run_reference(ref, p, STEPS)
        assert (decoded[row] - want_logits).abs().max() < 1e-4, row
        assert decoded[row].argmax(-1).tolist() == want_tokens


@torch.no_grad()
def test_two_adapters_in_one_batch_match_peft(family) -> None:
    ours, _, base, adapters = family
    manager = AdapterManager(ours, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for i, path in enumerate(adapters, start=1):
        req = AdapterRequest(ids=(str(path),), source="local")
        manager.install(i, req, manager.prepare(req))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapters[0],
                                     adapter_name="a1")  # fmt: skip
    peft.load_adapter(adapters[1], adapter_name="a2")
    peft.eval()
    names = ["__base__", "a1", "a2", "a2"]
    prompts = _prompts(ours.config.vocab_size)
    cache, blocks = _cache(ours), BlockManager(128, BLOCK)
    meta = ForwardBatch.build(torch.cat(prompts), LENGTHS, LENGTHS, _tables(blocks, LENGTHS), BLOCK,
                              logits_index=torch.arange(sum(LENGTHS)),
                              lora_segments=segments_of([0, 1, 2, 2], LENGTHS))  # fmt: skip
    got = ours.forward(meta, cache).split(LENGTHS)
    for name, p, logits in zip(names, prompts, got, strict=True):
        want = peft(p[None], adapter_names=[name]).logits[0]
        assert (logits - want).abs().max() < 1e-4, name
    base_logits = peft(prompts[1][None], adapter_names=["__base__"]).logits[0]
    assert (got[1] - base_logits).abs().max() > 1e-3  # the adapter really changes the output


def _reachable_linears(obj: object, seen: set[int]) -> Iterator[Linear]:
    """Every `Linear` reachable from `obj` through attributes and lists: the oracle for what the model
    lists (adapters used to find their targets this way)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Linear):
        yield obj
        return
    children = obj if isinstance(obj, list | tuple) else getattr(obj, "__dict__", {}).values()
    for child in children:
        if isinstance(child, Linear | list | tuple) or type(child).__module__.startswith("lorax_server."):
            yield from _reachable_linears(child, seen)


def test_the_model_lists_every_adaptable_linear(family) -> None:
    ours, _, _, _ = family
    adaptable = set(ours.spec.adaptable_modules)
    found = {
        name: (id(linear), part)
        for linear in _reachable_linears(ours, set())
        for part, name in enumerate(linear.part_names)
        if name.rsplit(".", 1)[-1] in adaptable
    }
    listed = {name: (id(linear), part) for name, (linear, part) in ours.adaptable_linears().items()}
    assert listed and listed == found
