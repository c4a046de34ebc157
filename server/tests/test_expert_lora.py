"""Mixtral expert LoRA in the per-expert layout hub adapters use (`...experts.{e}.w1` ...). peft cannot
mix such adapters in a batch, so the reference is transformers run on weights with each adapter merged
in (W + scale·B·A), each adapter alone; ours must match it alone and inside a mixed ragged batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ragged_runs import assert_matches, prompts, run_ours
from safetensors.torch import load_file, save_file
from tiny_models import make_model
from transformers import AutoModelForCausalLM, DbrxConfig, DbrxForCausalLM, MixtralConfig, MixtralForCausalLM

from lorax_server.adapters.loader import AdapterLoadError, load_lora_adapter
from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.forward import ForwardBatch
from lorax_server.layers import moe
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model

LENGTHS = [7, 3, 12, 5]
STEPS = 6
HIDDEN, INTER, LAYERS, EXPERTS = 64, 128, 2, 4
EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{e}"
SHAPES = {"w1": (INTER, HIDDEN), "w3": (INTER, HIDDEN), "w2": (HIDDEN, INTER)}
ATTN_SHAPES = {"q_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}
# adapter → (rank, alpha, {module: (out, in)}): the first adapts every expert's w1/w2/w3; the second
# w2 of experts 0 and 2 only, plus attention.
ADAPTERS = {
    "experts": (4, 8, {f"{EXPERT.format(layer=layer, e=e)}.{w}": SHAPES[w]
                       for layer in range(LAYERS) for e in range(EXPERTS) for w in SHAPES}),
    "some_experts_and_attention": (8, 4, {
        **{f"{EXPERT.format(layer=layer, e=e)}.w2": SHAPES["w2"] for layer in range(LAYERS) for e in (0, 2)},
        **{f"model.layers.{layer}.self_attn.{m}": s for layer in range(LAYERS) for m, s in ATTN_SHAPES.items()},
    }),
}  # fmt: skip


def write_adapter(out: Path, seed: int, r: int, alpha: float, modules: dict[str, tuple[int, int]]) -> Path:
    """A LoRA adapter in peft's file layout with random, clearly non-zero factors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (n_out, n_in) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, n_in, generator=g) / n_in**0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.1
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                         "target_modules": targets}))  # fmt: skip
    return out


def merged_checkpoint(base: Path, adapter: Path, out: Path, scale: float) -> Path:
    """`base` with the adapter merged into its weights: W + scale·B·A for every adapted module."""
    shutil.copytree(base, out)
    state = load_file(base / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    for key in lora:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            state[f"{module}.weight"] = state[f"{module}.weight"] + scale * b @ lora[key]
    save_file(state, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("expert_lora")
    base = make_model(MixtralConfig, MixtralForCausalLM, tmp / "base", num_local_experts=EXPERTS,
                      num_experts_per_tok=2, sliding_window=None)  # fmt: skip
    adapters, refs = [], [AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()]
    for i, (name, (r, alpha, modules)) in enumerate(ADAPTERS.items(), start=1):
        adapters.append(write_adapter(tmp / name, i, r, alpha, modules))
        merged = merged_checkpoint(base, adapters[-1], tmp / f"{name}_merged", alpha / r)
        refs.append(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
    ours = load_model(base, TorchAttention(4), torch.device("cpu"), "float32")
    manager = AdapterManager(ours, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for i, path in enumerate(adapters, start=1):
        req = AdapterRequest(ids=(str(path),), source="local")
        manager.install(i, req, manager.prepare(req))
    return ours, refs, manager


def test_each_expert_adapter_alone_matches_merged_weights(mixtral) -> None:
    ours, refs, _ = mixtral
    batch = prompts(ours.config.vocab_size, LENGTHS)
    for index in (1, 2):
        assert_matches(run_ours(ours, batch[:1], STEPS, adapters=[index]), 0, refs[index], batch[0])


def test_expert_adapters_in_one_mixed_ragged_batch(mixtral) -> None:
    ours, refs, _ = mixtral
    batch = prompts(ours.config.vocab_size, LENGTHS)
    rows = [0, 1, 2, 1]  # adapter 1 in two separate segments
    out = run_ours(ours, batch, STEPS, adapters=rows)
    for row, (index, p) in enumerate(zip(rows, batch, strict=True)):
        assert_matches(out, row, refs[index], p)
    base = run_ours(ours, batch[1:2], 1)[0][0]
    assert (out[0][1] - base).abs().max() > 1e-3  # the adapter really changes the output


def test_every_expert_on_every_token_matches_the_grouped_experts(mixtral, monkeypatch) -> None:
    """The GPU's sync-free path (every expert on every token, weighted by routing), forced on CPU:
    the same answers as the merged references and as the grouped path, with mixed expert adapters."""
    ours, refs, _ = mixtral
    batch = prompts(ours.config.vocab_size, LENGTHS)
    rows = [0, 1, 2, 1]
    grouped = run_ours(ours, batch, STEPS, adapters=rows)
    monkeypatch.setitem(moe.EVERY_EXPERT_MAX_TOKENS, "cpu", sum(LENGTHS))  # prefill and decode alike
    calls = []
    monkeypatch.setattr(moe.SparseMoE, "_adapters_in", lambda *a: calls.append(1) or [])  # the grouped path's
    every = run_ours(ours, batch, STEPS, adapters=rows)
    assert not calls  # the grouped path never ran
    for row, (index, p) in enumerate(zip(rows, batch, strict=True)):
        assert_matches(every, row, refs[index], p)
        assert (every[0][row] - grouped[0][row]).abs().max() < 1e-5  # prefill logits
    assert (every[1] - grouped[1]).abs().max() < 1e-5  # decode logits
    assert torch.equal(every[1].argmax(-1), grouped[1].argmax(-1))  # greedy tokens


def test_expert_adapter_targets_are_per_expert_linears(mixtral) -> None:
    _, _, manager = mixtral
    name = "model.layers.1.block_sparse_moe.experts.3.w3"
    linear, part = manager.targets[name]
    assert linear.part_names[part] == name and linear.lora.by_adapter.keys() == {1}
    assert manager.targets["model.layers.0.block_sparse_moe.experts.2.w2"][0].lora.by_adapter.keys() == {1, 2}


@pytest.mark.parametrize(
    ("segments", "adapters", "slots"),
    [
        ([], [], [0] * 5),
        ([(0, 5, 4)], [4], [1] * 5),
        ([(1, 3, 7), (3, 4, 2), (4, 5, 7)], [2, 7], [0, 2, 2, 1, 2]),
    ],
)
def test_adapter_slots(segments, adapters, slots) -> None:
    meta = ForwardBatch.build(torch.zeros(5, dtype=torch.int64), [5], [5], torch.zeros(1, 2, dtype=torch.int64),
                              4, lora_segments=segments)  # fmt: skip
    assert meta.lora_adapters() == adapters
    assert meta.adapter_slots().tolist() == slots


def _adapter_file(out: Path, module: str, shape_a: tuple[int, int], shape_b: tuple[int, int], **cfg) -> Path:
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg}))
    key = f"base_model.model.{module}"
    save_file({f"{key}.lora_A.weight": torch.zeros(shape_a), f"{key}.lora_B.weight": torch.zeros(shape_b)},
              out / "adapter_model.safetensors")  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("module", "error"),
    [
        ("model.layers.0.block_sparse_moe.gate", "'gate'.*MixtralForCausalLM cannot adapt"),  # the router
        ("model.layers.0.block_sparse_moe.experts.9.w1", "does not exist in the base model"),
    ],
)
def test_unsupported_mixtral_targets_are_refused(mixtral, tmp_path: Path, module: str, error: str) -> None:
    _, _, manager = mixtral
    adapter = _adapter_file(tmp_path / "bad", module, (2, HIDDEN), (EXPERTS, 2))
    with pytest.raises(AdapterLoadError, match=error):
        load_lora_adapter(adapter, manager.targets, "MixtralForCausalLM", torch.float32)


def test_target_parameters_adapters_are_refused(mixtral, tmp_path: Path) -> None:
    _, _, manager = mixtral
    module = "model.layers.0.block_sparse_moe.experts.0.w1"
    adapter = _adapter_file(tmp_path / "params", module, (2, HIDDEN), (INTER, 2), target_parameters=["experts.w1"])
    with pytest.raises(AdapterLoadError, match="target_parameters"):
        load_lora_adapter(adapter, manager.targets, "MixtralForCausalLM", torch.float32)


def test_dbrx_expert_lora_is_refused_not_dropped(tmp_path: Path) -> None:
    """DBRX stores each projection's experts as one tensor: LoRA on them is refused with a clear message."""
    base = make_model(DbrxConfig, DbrxForCausalLM, tmp_path / "base", d_model=HIDDEN,
                      attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                      ffn_config={"ffn_hidden_size": 32, "moe_num_experts": EXPERTS, "moe_top_k": 2})  # fmt: skip
    model = load_model(base, TorchAttention(4), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**20)
    assert {name.rsplit(".", 1)[-1] for name in manager.targets} == {"Wqkv", "out_proj"}
    adapter = _adapter_file(tmp_path / "bad", "transformer.blocks.0.ffn.experts.mlp.w1", (2, HIDDEN), (32, 2))
    with pytest.raises(AdapterLoadError, match="'w1'.*DbrxForCausalLM cannot adapt; adaptable modules: Wqkv, out_proj"):
        load_lora_adapter(adapter, manager.targets, "DbrxForCausalLM", torch.float32)
