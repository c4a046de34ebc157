"""The shard's side of LoRAX's launcher settings: `DISABLE_CUSTOM_KERNELS`, `DISABLE_SGMV`,
`MEMORY_WIGGLE_ROOM`, `WEIGHTS_CACHE_OVERRIDE` (from the environment, as LoRAX passes them),
`--compile-max-batch-size` and `--merge-adapter-weights`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_adapters import ALL_LINEAR, engine_and_peft, greedy_tokens, peft_greedy, prompt
from tiny_models import make_lora_adapter

from lorax_server import cli, decode_graphs
from lorax_server.adapters import lora, lora_cpu
from lorax_server.batch import RequestIn
from lorax_server.layers.attention import TorchAttention
from lorax_server.sampling import SamplingParams
from lorax_server.utils.hub import WeightsDownloadError, download_weights

CPU = torch.device("cpu")


def config(*argv: str) -> cli.ShardConfig:
    return cli._shard_config(cli._parser().parse_args(["serve", "m", *argv]))


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DISABLE_CUSTOM_KERNELS", "DISABLE_SGMV", "MEMORY_WIGGLE_ROOM"):
        monkeypatch.delenv(name, raising=False)
    plain = config()
    assert (plain.disable_custom_kernels, plain.disable_sgmv, plain.memory_wiggle_room) == (False, False, 1.0)
    monkeypatch.setenv("DISABLE_CUSTOM_KERNELS", "true")
    monkeypatch.setenv("DISABLE_SGMV", "1")
    monkeypatch.setenv("MEMORY_WIGGLE_ROOM", "0.8")
    given = config("--compile-max-batch-size", "24")
    assert (given.disable_custom_kernels, given.disable_sgmv, given.memory_wiggle_room) == (True, True, 0.8)
    assert given.compile_max_batch_size == 24
    for bad in ("0", "1.5", "lots", "nan"):
        monkeypatch.setenv("MEMORY_WIGGLE_ROOM", bad)
        with pytest.raises(SystemExit, match="MEMORY_WIGGLE_ROOM"):
            config()


def test_disabled_custom_kernels_leave_torch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISABLE_CUSTOM_KERNELS", "true")
    monkeypatch.setenv("LORAX_CPU_KERNELS", "1")
    try:
        backend = cli.choose_kernels(config(), CPU)
        assert isinstance(backend, TorchAttention)
        assert os.environ["LORAX_CPU_KERNELS"] == "0" and lora.kernels() == "torch"
        with pytest.raises(SystemExit, match="only torch"):
            cli.choose_kernels(config("--attention-backend", "triton"), CPU)
    finally:
        lora.set_kernels("torch")


def test_disable_sgmv_computes_lora_by_the_reference_plans(llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Outputs still equal peft's, and the CPU kernel is never called."""
    dirs = {
        "a": make_lora_adapter(llama_dir, tmp_path / "a", 8, r=8, lora_alpha=16, target_modules=ALL_LINEAR),
        "b": make_lora_adapter(llama_dir, tmp_path / "b", 9, r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
    }
    engine, ref, indices = engine_and_peft(llama_dir, dirs)
    monkeypatch.setenv("DISABLE_SGMV", "1")
    cli.choose_kernels(config(), CPU)
    called = []
    monkeypatch.setattr(lora_cpu, "sgmv_", lambda *a, **k: called.append(1))
    try:
        rows = [("a", 7), ("b", 12), ("__base__", 5), ("a", 3)]
        requests = [
            RequestIn(i, prompt(i, n), SamplingParams(), 5, ignore_eos=True, adapter_index=indices.get(name, 0))
            for i, (name, n) in enumerate(rows)
        ]
        tokens = greedy_tokens(engine, requests, 1)
        for r, (name, _) in zip(requests, rows, strict=True):
            assert tokens[r.id] == peft_greedy(ref, r.input_ids, name, 5), name
        assert not called
    finally:
        lora.set_kernels("torch")


def test_weights_cache_override_is_where_the_model_is_read(llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    copy = shutil.copytree(llama_dir, tmp_path / "weights")
    monkeypatch.setenv("WEIGHTS_CACHE_OVERRIDE", str(copy))
    assert download_weights("org/not-on-any-hub") == copy
    monkeypatch.setenv("WEIGHTS_CACHE_OVERRIDE", str(tmp_path / "missing"))
    with pytest.raises(WeightsDownloadError, match="WEIGHTS_CACHE_OVERRIDE"):
        download_weights("org/not-on-any-hub")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("WEIGHTS_CACHE_OVERRIDE", str(tmp_path / "empty"))
    with pytest.raises(WeightsDownloadError):
        download_weights("org/not-on-any-hub")


def test_compile_max_batch_size_caps_the_captured_batches(llama_dir: Path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    from lorax_server.engine import CacheConfig, Engine
    from lorax_server.layers.triton.attention import TritonAttention
    from lorax_server.models.loader import load_model

    monkeypatch.setitem(decode_graphs.CAPTURE_BY_DEVICE, "cpu", decode_graphs.replay_eagerly)
    lora.set_kernels("triton")
    try:
        model = load_model(llama_dir, TritonAttention(4), CPU, "float32")
        tokenizer = AutoTokenizer.from_pretrained(llama_dir)
        for cap, largest in ((24, 24), (30, 24), (128, 128)):
            engine = Engine(
                model, tokenizer, CacheConfig(4, num_blocks=257), cuda_graphs=True, cuda_graph_max_batch=cap
            )
            engine.warmup(32, 64, 64)
            assert engine.graphs.buckets[-1] == largest
    finally:
        lora.set_kernels("torch")


def test_merge_needs_the_adapter_and_reports_why_it_cannot(llama_dir: Path, tmp_path: Path) -> None:
    from lorax_server.adapters.sources import fetch_adapter
    from lorax_server.models.loader import load_model

    model = load_model(llama_dir, TorchAttention(4), CPU, "float32")
    with pytest.raises(SystemExit, match="--default-adapter-id"):
        cli._merge_default_adapter(config("--merge-adapter-weights"), model, fetch_adapter)
    missing = config("--merge-adapter-weights", "--default-adapter-id", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="cannot merge"):
        cli._merge_default_adapter(missing, model, fetch_adapter)
    adapter = make_lora_adapter(llama_dir, tmp_path / "a", 3, r=4, lora_alpha=8, target_modules=["q_proj"])
    given = config("--merge-adapter-weights", "--default-adapter-id", str(adapter), "--default-adapter-source", "local")
    cli._merge_default_adapter(given, model, fetch_adapter)  # what test_merge_into_base checks, from the flags
