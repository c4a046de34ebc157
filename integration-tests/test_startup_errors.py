"""A checkpoint that cannot be served stops the launcher at start-up with a message naming the
problem and a non-zero exit code, instead of hanging or serving something wrong."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BIN, free_port
from safetensors.torch import load_file, save_file
from tiny_models import make_llama, make_model


def run_launcher(model_dir: Path, tmp: Path, max_total_tokens: int = 64, *extra: str) -> subprocess.CompletedProcess:
    args = [str(BIN / "lorax-launcher"), "--model-id", str(model_dir), "--port", str(free_port()),
            "--shard-uds-path", str(tmp / "shard"), "--kv-cache-blocks", "16",
            "--max-input-length", "32", "--max-total-tokens", str(max_total_tokens),
            "--max-batch-prefill-tokens", "64", *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)


def _edit_weights(model_dir: Path, edit) -> None:  # noqa: ANN001
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown architecture", "FooForCausalLM"),
        ("missing tensor", "model.layers.1.mlp.down_proj.weight"),
        ("wrong shape", "model.layers.0.self_attn.k_proj.weight"),
    ],
)
def test_bad_checkpoint_fails_fast_with_a_message(tmp_path: Path, case: str, expected: str) -> None:
    model_dir = make_llama(tmp_path / "m")
    if case == "unknown architecture":
        cfg = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"]}))
    elif case == "missing tensor":
        _edit_weights(model_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    else:
        _edit_weights(model_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)}))
    done = run_launcher(model_dir, tmp_path)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert expected in output, output[-3000:]


def test_more_tokens_than_learned_positions_fails_fast(tmp_path: Path) -> None:
    """GPT-2 has a fixed table of positions: a --max-total-tokens beyond it is refused at start-up
    (and so never fails a batch later)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = make_model(GPT2Config, GPT2LMHeadModel, tmp_path / "gpt2", max_position_embeddings=48)
    done = run_launcher(model_dir, tmp_path, max_total_tokens=64)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "max_total_tokens=64 exceeds the 48 positions" in output, output[-3000:]


def test_a_model_that_does_not_split_over_the_shards_names_the_number(tmp_path: Path) -> None:
    model_dir = make_llama(tmp_path / "m", hidden_size=96, num_attention_heads=3, num_key_value_heads=3)
    done = run_launcher(model_dir, tmp_path, 64, "--num-shard", "2")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "the number of attention heads (3) does not divide over 2 shards" in output, output[-3000:]
