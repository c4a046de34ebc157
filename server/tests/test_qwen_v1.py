"""Qwen (v1, `QWenLMHeadModel`): transformers has no class for it, but it is Qwen2 without grouped-query
attention under other names. A tiny random Qwen2 (no sliding window, kv heads == heads) is rewritten
into Qwen-v1 weight names and config.json; ours, loaded from the rewritten checkpoint, must equal
transformers' Qwen2 on the original, and peft adapters of the Qwen2 model, renamed the same way, must
equal peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import QKV, RENAMES, SEQ_LENGTH, build_family
from peft import PeftModel
from ragged_runs import assert_matches, prompts, run_ours
from safetensors.torch import load_file, save_file
from tiny_models import make_lora_adapter
from transformers import AutoModelForCausalLM

from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model

LENGTHS = [7, 3, 12, 5]
STEPS = 16


def qwen_v1_adapter(src: Path, dst: Path) -> Path:
    """A peft adapter of the Qwen2 model as one of the Qwen v1 model. q/k/v updates become one update of
    the fused c_attn: A stacked, B block-diagonal (a part the adapter skips gets zero rows); its
    rank/alpha patterns keep each part's alpha / r."""
    cfg = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in tensors}
    out, fused_rank = {}, 0
    for i in sorted(layers):
        old, new = f"base_model.model.model.layers.{i}", f"base_model.model.transformer.h.{i}"
        for a, b in RENAMES.items():
            for side in "AB":
                if f"{old}.{a}.lora_{side}.weight" in tensors:
                    out[f"{new}.{b}.lora_{side}.weight"] = tensors[f"{old}.{a}.lora_{side}.weight"]
        parts = {p: pos for pos, p in enumerate(QKV) if f"{old}.self_attn.{p}.lora_A.weight" in tensors}
        if not parts:
            continue
        a_parts = [tensors[f"{old}.self_attn.{p}.lora_A.weight"] for p in parts]
        fused_rank, hidden = sum(a.shape[0] for a in a_parts), a_parts[0].shape[1]  # no GQA: q, k, v all `hidden`
        b = torch.zeros(3 * hidden, fused_rank)
        r = 0
        for p, pos in parts.items():
            part_b = tensors[f"{old}.self_attn.{p}.lora_B.weight"]
            b[pos * hidden : (pos + 1) * hidden, r : r + part_b.shape[1]] = part_b
            r += part_b.shape[1]
        out[f"{new}.attn.c_attn.lora_A.weight"] = torch.cat(a_parts)
        out[f"{new}.attn.c_attn.lora_B.weight"] = b
    dst.mkdir(parents=True)
    save_file(out, dst / "adapter_model.safetensors")
    names = {"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn"} | {
        a.rsplit(".", 1)[-1]: b.rsplit(".", 1)[-1] for a, b in RENAMES.items()
    }
    cfg["target_modules"] = sorted({names[t] for t in cfg["target_modules"]})
    if fused_rank:
        cfg["rank_pattern"] = {"c_attn": fused_rank}
        cfg["alpha_pattern"] = {"c_attn": cfg["lora_alpha"] * fused_rank / cfg["r"]}
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    served, reference = build_family("qwen_v1", tmp_path_factory.mktemp("qwen_v1"))
    return reference, served


def test_config_caps_the_context_at_seq_length(qwen) -> None:
    ours = load_model(qwen[1], TorchAttention(4), torch.device("cpu"), "float32")
    c = ours.config
    assert (c.max_position_embeddings, c.intermediate_size, c.num_kv_heads) == (SEQ_LENGTH, 128, c.num_heads)
    assert (c.rope.theta, c.norm_eps) == (20000.0, 1e-5)
    assert ours.spec.family == "qwen"


def test_prefill_and_decode_match_qwen2(qwen) -> None:
    qwen2, qwen_dir = qwen
    ours = load_model(qwen_dir, TorchAttention(4), torch.device("cpu"), "float32")
    ref = AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32).eval()
    batch = prompts(ours.config.vocab_size, LENGTHS)
    out = run_ours(ours, batch, STEPS)
    for row, p in enumerate(batch):
        assert_matches(out, row, ref, p)


def test_renamed_adapters_in_one_batch_match_peft(qwen, tmp_path: Path) -> None:
    qwen2, qwen_dir = qwen
    targets = [["q_proj", "k_proj", "v_proj", "o_proj"], ["k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]]
    peft_dirs = [
        make_lora_adapter(qwen2, tmp_path / f"peft{i}", i, r=4 * (i + 1), lora_alpha=8, target_modules=t)
        for i, t in enumerate(targets)
    ]
    ours = load_model(qwen_dir, TorchAttention(4), torch.device("cpu"), "float32")
    manager = AdapterManager(ours, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for i, path in enumerate(peft_dirs, start=1):
        req = AdapterRequest(ids=(str(qwen_v1_adapter(path, tmp_path / f"qwen{i}")),), source="local")
        manager.install(i, req, manager.prepare(req))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32), peft_dirs[0],
                                     adapter_name="a1")  # fmt: skip
    peft.load_adapter(peft_dirs[1], adapter_name="a2")
    peft.eval()
    batch = prompts(ours.config.vocab_size, LENGTHS)
    rows = [0, 1, 2, 2]
    out = run_ours(ours, batch, 4, adapters=rows)
    for row, (index, p) in enumerate(zip(rows, batch, strict=True)):
        if index:
            peft.set_adapter(f"a{index}")
            assert_matches(out, row, peft, p)
        else:
            with peft.disable_adapter():
                assert_matches(out, row, peft, p)
    base = run_ours(ours, batch[1:2], 1)[0][0]
    assert (out[0][1] - base).abs().max() > 1e-3  # the adapter really changes the output
