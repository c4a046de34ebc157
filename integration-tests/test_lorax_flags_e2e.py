"""LoRAX's launcher flags beyond DESIGN.md's list, end to end: adapters preloaded and pinned before the
server first answers `/health`, requests' default adapter source, an adapter merged into the base weights
(`--merge-adapter-weights`), flags accepted for compatibility (logged), and flags this server cannot honour
refused at start with the reason."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import requests
import torch
from conftest import BIN, free_port, launch
from peft import PeftModel
from tiny_models import make_lora_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW = 6
PROMPTS = ["The quick brown fox", "1 + 1 ="]


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("flags-adapters")
    specs = [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]),
    ]
    return [make_lora_adapter(llama_dir, tmp / f"a{i}", 70 + i, **spec) for i, spec in enumerate(specs)]


@pytest.fixture(scope="module")
def peft_tokens(llama_dir: Path, adapters: list[Path]):
    """Greedy tokens from peft for (adapter index, prompt)."""
    tok = AutoTokenizer.from_pretrained(llama_dir)
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    model.load_adapter(adapters[1], adapter_name="a1")
    model.eval()

    @torch.no_grad()
    def greedy(index: int, prompt: str) -> list[int]:
        seq = torch.tensor([tok(prompt).input_ids])
        out = []
        for _ in range(NEW):
            nxt = int(model(seq, adapter_names=[f"a{index}"]).logits[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        return out

    return greedy


def generate(url: str, prompt: str, **params: object) -> requests.Response:
    parameters = {"max_new_tokens": NEW, "ignore_eos_token": True, "details": True, **params}
    return requests.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120)


def token_ids(r: requests.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_preloaded_adapters_are_pinned_before_health(llama_dir, adapters, peft_tokens, tmp_path) -> None:
    ids = ",".join(str(a) for a in adapters)
    flags = ["--preloaded-adapter-ids", ids, "--preloaded-adapter-source", "local", "--default-adapter-source",
             "local", "--max-active-adapters", "3", "--backend", "fa2", "--compile-max-rank", "8",
             "--watermark-gamma", "0.25", "--watermark-delta", "4"]  # fmt: skip
    with launch(llama_dir, tmp_path, *flags) as server:
        # The first /health that answered 200 came after both were active: nothing is loading now.
        listed = {a["adapter_id"]: a for a in requests.get(f"{server.url}/adapters", timeout=10).json()}
        for adapter in adapters:
            entry = listed[str(adapter)]
            assert (entry["state"], entry["pinned"], entry["adapter_source"]) == ("active", True, "local"), entry
        # A request naming an adapter without a source takes --default-adapter-source (local).
        for i, adapter in enumerate(adapters):
            for prompt in PROMPTS:
                assert token_ids(generate(server.url, prompt, adapter_id=str(adapter))) == peft_tokens(i, prompt)
        unload = requests.post(f"{server.url}/adapters/unload", json={"adapter_id": str(adapters[0])}, timeout=10)
        assert unload.status_code == 409 and "pinned" in unload.json()["error"]
        # Watermarked with the launcher's gamma and delta: the paper's detector finds it.
        prompt_ids = AutoTokenizer.from_pretrained(llama_dir)(PROMPTS[0]).input_ids
        for on in (True, False):
            r = generate(server.url, PROMPTS[0], max_new_tokens=60, do_sample=True, seed=3, watermark=on)
            z = z_score(prompt_ids, token_ids(r), 0.25)
            assert (z > 4.0) == on, (on, z)
        log = server.log()
    assert "accepted for LoRAX compatibility, without effect: --backend" in log
    assert "--compile-max-rank" in log


def z_score(prompt: list[int], tokens: list[int], gamma: float, vocab: int = 320) -> float:
    """Kirchenbauer et al.'s detector with their key, as TGI's and LoRAX's watermark seeds it."""
    previous, green = [prompt[-1], *tokens[:-1]], 0
    for p, t in zip(previous, tokens, strict=True):
        rng = torch.Generator().manual_seed(15485863 * p)
        green += t in torch.randperm(vocab, generator=rng)[: int(vocab * gamma)].tolist()
    return (green - gamma * len(tokens)) / (len(tokens) * gamma * (1 - gamma)) ** 0.5


def test_merged_adapter_serves_its_model_and_nothing_else(llama_dir, adapters, peft_tokens, tmp_path) -> None:
    flags = ["--adapter-id", str(adapters[1]), "--adapter-source", "local", "--merge-adapter-weights"]
    with launch(llama_dir, tmp_path, *flags) as server:
        for prompt in PROMPTS:
            merged = peft_tokens(1, prompt)
            assert token_ids(generate(server.url, prompt)) == merged
            assert (
                token_ids(generate(server.url, prompt, adapter_id=str(adapters[1]), adapter_source="local")) == merged
            )
            assert token_ids(generate(server.url, prompt, adapter_id=str(llama_dir))) == merged
        other = generate(server.url, PROMPTS[0], adapter_id=str(adapters[0]), adapter_source="local")
        assert other.status_code == 422 and "--merge-adapter-weights" in other.json()["error"], other.text
        assert requests.get(f"{server.url}/adapters", timeout=10).json() == []
        assert "merged" in server.log() and "dynamic adapters are off" in server.log()


def run_launcher(model_dir: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [str(BIN / "lorax-launcher"), "--model-id", str(model_dir), "--port", str(free_port()),
            "--shard-uds-path", str(tmp / "shard"), "--kv-cache-blocks", "64", "--max-input-length", "32",
            "--max-total-tokens", "64", "--max-batch-prefill-tokens", "64", *extra]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_a_preloaded_adapter_that_cannot_load_stops_the_launcher(llama_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    done = run_launcher(
        llama_dir, tmp_path, "--preloaded-adapter-ids", str(missing), "--preloaded-adapter-source", "local"
    )
    assert done.returncode != 0
    assert f"--preloaded-adapter-ids: {missing} could not be loaded" in done.stdout + done.stderr


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--ngrok"], "--ngrok is not supported"),
        (["--source", "s3"], "download the model and give its directory"),
        (["--merge-adapter-weights"], "--merge-adapter-weights needs the adapter to merge"),
        (["--eager", "--compile"], "exclude each other"),
    ],
)
def test_flags_it_cannot_honour_are_refused_before_anything_starts(tmp_path: Path, flags, expected) -> None:
    done = run_launcher(tmp_path, tmp_path, *flags)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
