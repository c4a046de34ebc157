"""Dynamic LoRA adapters end to end: every request names its adapter, requests for different adapters
share batches, and every answer equals peft's for that adapter alone."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from conftest import launch
from fake_hub import FakeHub
from peft import PeftModel
from tiny_models import make_lora_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR, use_rslora=True),
    dict(r=64, lora_alpha=24, target_modules=["k_proj", "o_proj", "up_proj"]),
    dict(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"]),
    dict(r=4, lora_alpha=2, target_modules=ALL_LINEAR),
]
PROMPTS = ["The quick brown fox", "Paged attention", "1 + 1 =", "def add(a, b):", "LoRA adapters add"]
NEW = 8


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(llama_dir, tmp / f"a{i}", 10 + i, **spec) for i, spec in enumerate(SPECS)]


@pytest.fixture(scope="module")
def reference(llama_dir: Path, adapters: list[Path]):
    """Greedy tokens from peft, per (adapter path or None, prompt)."""
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), adapters[0], adapter_name="a0"
    )
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    names = {str(p): f"a{i}" for i, p in enumerate(adapters)}
    cache: dict = {}

    @torch.no_grad()
    def greedy(adapter: Path | None, prompt: str) -> list[int]:
        key = (str(adapter) if adapter else None, prompt)
        if key not in cache:
            name = names[str(adapter)] if adapter else "__base__"
            seq = torch.tensor([tok(prompt).input_ids])
            out = []
            for _ in range(NEW):
                nxt = int(model(seq, adapter_names=[name]).logits[0, -1].argmax())
                out.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
            cache[key] = out
        return cache[key]

    return greedy


def generate(
    server, prompt: str, adapter: Path | str | None = None, source: str = "local", **params
) -> requests.Response:
    parameters = {"max_new_tokens": NEW, "ignore_eos_token": True, "details": True, **params}
    if adapter is not None:
        parameters.update(adapter_id=str(adapter), adapter_source=source)
    return requests.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=300)


def token_ids(r: requests.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_mixed_concurrent_batch_equals_peft(server, adapters, reference) -> None:
    cases = [(a, p) for a in [None, *adapters[:4]] for p in PROMPTS[:3]]
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda c: token_ids(generate(server, c[1], c[0])), cases))
    for (adapter, prompt), ids in zip(cases, got, strict=True):
        assert ids == reference(adapter, prompt), (adapter, prompt)
    assert any(got[i] != got[0] for i in range(3, len(got), 3))  # adapters change the output


def test_streaming_with_an_adapter(server, adapters, reference) -> None:
    body = {"inputs": PROMPTS[4], "parameters": {"max_new_tokens": NEW, "ignore_eos_token": True,
            "adapter_id": str(adapters[2]), "adapter_source": "local"}}  # fmt: skip
    with requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=120) as r:
        ids = [json.loads(line[5:])["token"]["id"] for line in r.iter_lines() if line.startswith(b"data:")]
    assert ids == reference(adapters[2], PROMPTS[4])


def test_lorax_client_with_adapter(server, adapters, reference) -> None:
    from lorax import Client

    resp = Client(server.url).generate(
        PROMPTS[0], adapter_id=str(adapters[1]), adapter_source="local", max_new_tokens=NEW, ignore_eos_token=True
    )
    assert [t.id for t in resp.details.tokens] == reference(adapters[1], PROMPTS[0])


BAD = {
    "path that does not exist": ("/no/such/adapter", 422, "does not exist"),
    "missing files": ("EMPTY", 422, "adapter_config.json"),
    "corrupt safetensors": ("CORRUPT", 422, "safetensors"),
    "shape mismatch": ("WIDE", 422, "shape mismatch"),
    "unsupported module": ("EMBED", 422, "embed_tokens"),
}


@pytest.fixture(scope="module")
def bad_adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_models import make_llama

    tmp = tmp_path_factory.mktemp("bad")
    empty = tmp / "empty"
    empty.mkdir()
    corrupt = make_lora_adapter(llama_dir, tmp / "corrupt", 0, r=4, target_modules=["q_proj"])
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    wide = make_llama(tmp / "wide_base", hidden_size=96, intermediate_size=160)
    return {
        "EMPTY": empty,
        "CORRUPT": corrupt,
        "WIDE": make_lora_adapter(wide, tmp / "wide", 0, r=4, target_modules=["q_proj"]),
        "EMBED": make_lora_adapter(llama_dir, tmp / "embed", 0, r=4, target_modules=["embed_tokens", "q_proj"]),
    }


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_fail_alone(server, adapters, bad_adapters, reference, case: str) -> None:
    """A bad adapter fails only its own request, with a precise 4xx; good requests sent at the same
    time (base and adapter) finish correctly and the server stays healthy."""
    path, status, message = BAD[case]
    path = bad_adapters.get(path, path)
    with ThreadPoolExecutor(3) as pool:
        bad = pool.submit(generate, server, PROMPTS[0], path)
        good_base = pool.submit(generate, server, PROMPTS[1])
        good_adapter = pool.submit(generate, server, PROMPTS[2], adapters[3])
        r = bad.result()
        assert r.status_code == status, r.text
        assert message in r.json()["error"]
        assert token_ids(good_base.result()) == reference(None, PROMPTS[1])
        assert token_ids(good_adapter.result()) == reference(adapters[3], PROMPTS[2])
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_bad_merge_parameters_are_422(server, adapters) -> None:
    merged = {"ids": [str(adapters[0]), str(adapters[1])], "weights": [1.0], "merge_strategy": "linear"}
    r = requests.post(
        f"{server.url}/generate",
        json={"inputs": "hi", "parameters": {"merged_adapters": merged, "adapter_source": "local"}},
        timeout=60,
    )
    assert r.status_code == 422 and "weights" in r.json()["error"]


def test_eviction_churn_with_two_active_adapters(llama_dir, adapters, reference, tmp_path: Path) -> None:
    """6 adapters, at most 2 active, 60 concurrent mixed requests: nothing is lost or mixed up."""
    cases = [(adapters[i % 6], PROMPTS[(i // 6) % len(PROMPTS)]) for i in range(60)]
    with launch(llama_dir, tmp_path, "--max-active-adapters", "2", "--adapter-cycle-time-s", "1") as server:
        with ThreadPoolExecutor(60) as pool:
            got = list(pool.map(lambda c: token_ids(generate(server, c[1], c[0])), cases))
    for (adapter, prompt), ids in zip(cases, got, strict=True):
        assert ids == reference(adapter, prompt), (adapter, prompt)


def _adapter_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}


def test_hub_adapters_slow_and_private(llama_dir, adapters, reference, tmp_path: Path) -> None:
    """A slow hub download does not stop other adapters' requests; a private adapter needs its token."""
    hub = FakeHub(tmp_path / "hub").start()
    try:
        hub.add_repo("org/slow", _adapter_files(adapters[4]), delay_s=2.0)
        hub.add_repo("org/private", _adapter_files(adapters[5]), private=True, token="hf_right")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache")}
        with launch(llama_dir, tmp_path, env=env) as server:
            token_ids(generate(server, PROMPTS[0], adapters[0]))  # warm: adapter 0 active
            slow_done = threading.Event()
            slow_result: list = []

            def slow() -> None:
                slow_result.append(generate(server, PROMPTS[3], "org/slow", source="hub"))
                slow_done.set()

            thread = threading.Thread(target=slow)
            thread.start()
            time.sleep(0.3)
            fast = [token_ids(generate(server, p, adapters[0])) for p in PROMPTS[:3]]
            assert not slow_done.is_set(), "other adapters' requests waited for the slow download"
            thread.join(timeout=120)
            assert token_ids(slow_result[0]) == reference(adapters[4], PROMPTS[3])
            assert fast == [reference(adapters[0], p) for p in PROMPTS[:3]]

            r = generate(server, PROMPTS[0], "org/private", source="hub")
            assert r.status_code == 401 and "api_token" in r.json()["error"]
            r = generate(server, PROMPTS[0], "org/private", source="hub", api_token="hf_wrong")
            assert r.status_code in (401, 403), r.text
            ok = generate(server, PROMPTS[0], "org/private", source="hub", api_token="hf_right")
            assert token_ids(ok) == reference(adapters[5], PROMPTS[0])
            r = generate(server, PROMPTS[0], "org/private", source="hub")  # cached, but not for this caller
            assert r.status_code == 401, r.text
    finally:
        hub.stop()
