"""download_weights against local directories and a fake Hub (server/tests/fake_hub.py): no network."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from lorax_server.utils import hub
from lorax_server.utils.convert import convert_bin_to_safetensors
from lorax_server.utils.hub import WeightsDownloadError, download_weights, select_files

SERVER_DIR = Path(__file__).resolve().parents[1]

SUPPORT = {
    "config.json": b'{"model_type": "llama"}',
    "generation_config.json": b'{"eos_token_id": 2}',
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"model_max_length": 128}',
    "special_tokens_map.json": b'{"eos_token": "</s>"}',
    "tokenizer.model": b"sentencepiece",
}
# Files a server never needs: other frameworks' weights, docs, subfolders, training state.
UNNEEDED = {
    "flax_model.msgpack": b"\0" * (2 << 20),
    "tf_model.h5": b"\0" * (2 << 20),
    "README.md": b"# model card",
    ".gitattributes": b"*.bin filter=lfs",
    "onnx/model.onnx": b"\0" * 1024,
    "original/consolidated.safetensors": b"\0" * 1024,
}


def _bin(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _tied_state_dict() -> dict[str, torch.Tensor]:
    """Tied embeddings (two names, one tensor) and views into one fused buffer, as .bin files hold them."""
    embed = torch.randn(16, 8)
    fused = torch.randn(24, 8)
    q, k, v = fused.split(8)
    return {"embed.weight": embed, "lm_head.weight": embed, "q.weight": q, "k.weight": k, "v.weight": v}


class _Exploit:
    """Unpickling this runs code: weights_only loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


# Local directories ------------------------------------------------------------------------------


def test_local_dir_passes_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_bytes(SUPPORT["config.json"])
    (tmp_path / "model.safetensors").write_bytes(save({"w": torch.ones(2)}))
    assert download_weights(str(tmp_path)) == tmp_path
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_local_bin_dir_converted_once(tmp_path: Path) -> None:
    state = _tied_state_dict()
    (tmp_path / "pytorch_model.bin").write_bytes(_bin(state))
    assert download_weights(str(tmp_path)) == tmp_path
    out = tmp_path / "model.safetensors"
    loaded = load_file(out)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(loaded[name], tensor)
    mtime = out.stat().st_mtime_ns
    download_weights(str(tmp_path))
    assert out.stat().st_mtime_ns == mtime
    assert not (tmp_path / "model.safetensors.index.json").exists()  # one file: no index


def test_local_bin_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(_bin({"w": torch.ones(2)}))
    monkeypatch.setattr(hub, "_is_writable", lambda folder: False)
    with pytest.raises(WeightsDownloadError, match="not writable"):
        download_weights(str(tmp_path))
    assert not list(tmp_path.glob("*.safetensors"))


def test_local_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "training_args.bin").write_bytes(_bin({"lr": 1.0}))
    with pytest.raises(WeightsDownloadError, match="no weights"):
        download_weights(str(tmp_path))


def test_missing_local_path() -> None:
    with pytest.raises(WeightsDownloadError, match="not an existing local directory"):
        download_weights("/nonexistent/model/dir")


def test_sharded_bin_conversion_writes_index(tmp_path: Path) -> None:
    shards = {
        "pytorch_model-00001-of-00002.bin": {"a": torch.ones(3)},
        "pytorch_model-00002-of-00002.bin": {"b": torch.zeros(2, 2, dtype=torch.float16)},
    }
    weight_map = {name: file for file, sd in shards.items() for name in sd}
    for file, sd in shards.items():
        (tmp_path / file).write_bytes(_bin(sd))
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    convert_bin_to_safetensors(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }
    assert index["metadata"]["total_size"] == 3 * 4 + 4 * 2
    assert load_file(tmp_path / "model-00002-of-00002.safetensors")["b"].dtype == torch.float16


# Hub downloads ----------------------------------------------------------------------------------


def test_select_files_prefers_safetensors_and_top_level() -> None:
    files = [
        *SUPPORT,
        *UNNEEDED,
        "model.safetensors",
        "pytorch_model.bin",
        "training_args.bin",
        "modeling_x.py",
    ]
    assert select_files(files) == sorted([*SUPPORT, "model.safetensors", "modeling_x.py"])
    bin_only = [*SUPPORT, "pytorch_model.bin", "training_args.bin", "consolidated.pth"]
    assert select_files(bin_only) == sorted([*SUPPORT, "pytorch_model.bin"])


def test_select_files_takes_sentence_transformers_modules() -> None:
    modules = [
        "modules.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
        "2_Dense_256/config.json",
        "2_Dense_256/model.safetensors",
        "2_Dense_256/pytorch_model.bin",  # a copy of the safetensors: skipped
        "3_Dense/config.json",
        "3_Dense/pytorch_model.bin",  # the module's only weights: kept
    ]
    files = [*SUPPORT, "model.safetensors", *modules, "2_Dense_256/README.md", "1_Pooling/extra/config.json"]
    assert select_files(files) == sorted(
        [*SUPPORT, "model.safetensors", *(m for m in modules if m != "2_Dense_256/pytorch_model.bin")]
    )
    # Without modules.json numbered directories are not modules: nothing below the top level is taken.
    assert select_files([*SUPPORT, "model.safetensors", "1_Pooling/config.json"]) == sorted(
        [*SUPPORT, "model.safetensors"]
    )


def test_hub_download_fetches_sentence_transformers_modules(hub_env) -> None:
    pooling = b'{"word_embedding_dimension": 4, "pooling_mode_mean_tokens": true}'
    files = {**SUPPORT, "model.safetensors": save({"w": torch.randn(4, 4)})}
    files |= {"modules.json": b"[]", "1_Pooling/config.json": pooling, "onnx/model.onnx": b"\0"}
    hub_env.add_repo("org/embedder", files)
    path = download_weights("org/embedder")
    assert (path / "modules.json").read_bytes() == b"[]"
    assert (path / "1_Pooling" / "config.json").read_bytes() == pooling
    assert not (path / "onnx").exists()


def test_hub_download_fetches_only_needed_files(hub_env, tmp_path: Path) -> None:
    weights = {"w": torch.randn(4, 4)}
    files = {
        **SUPPORT,
        **UNNEEDED,
        "model.safetensors": save(weights),
        "pytorch_model.bin": _bin(weights),
        "training_args.bin": b"not weights",
    }
    hub_env.add_repo("org/tiny", files)
    path = download_weights("org/tiny")
    assert path.is_relative_to(tmp_path / "cache")
    wanted = {*SUPPORT, "model.safetensors"}
    assert set(os.listdir(path)) == wanted
    assert hub_env.downloaded("org/tiny") == wanted
    torch.testing.assert_close(load_file(path / "model.safetensors")["w"], weights["w"])


def test_hub_sharded_safetensors_skip_other_layouts(hub_env) -> None:
    shards = {"model-00001-of-00002.safetensors": {"a": torch.ones(2)}}
    shards["model-00002-of-00002.safetensors"] = {"b": torch.zeros(2)}
    index = {"metadata": {}, "weight_map": {name: file for file, sd in shards.items() for name in sd}}
    files = {name: save(sd) for name, sd in shards.items()}
    files |= {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode()}
    files["consolidated.safetensors"] = save({"a": torch.ones(2), "b": torch.zeros(2)})
    hub_env.add_repo("org/sharded", files)
    path = download_weights("org/sharded", revision="main")
    assert set(os.listdir(path)) == set(files) - {"consolidated.safetensors"}


def test_hub_bin_only_repo_converted_once(hub_env) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    hub_env.add_repo(
        "org/bin-only",
        {
            "config.json": config.to_json_string().encode(),
            "pytorch_model.bin": _bin(state),
            "training_args.bin": _bin({"lr": 1.0}),
        },
    )
    path = download_weights("org/bin-only")
    out = path / "model.safetensors"
    assert set(load_file(out)) == set(state)
    assert hub_env.downloaded("org/bin-only") == {"config.json", "pytorch_model.bin"}

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)

    mtime = out.stat().st_mtime_ns
    requests_before = len(hub_env.requests)
    assert download_weights("org/bin-only") == path
    assert out.stat().st_mtime_ns == mtime  # not converted again
    assert not [p for m, p in hub_env.requests[requests_before:] if m == "GET" and "/resolve/" in p]


def test_hub_malicious_bin_is_refused(hub_env, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hub_env.add_repo("org/evil", {"config.json": b"{}", "pytorch_model.bin": _bin({"w": _Exploit(marker)})})
    with pytest.raises(WeightsDownloadError, match="weights_only"):
        download_weights("org/evil")
    assert not marker.exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_private_repo_needs_token(hub_env, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"config.json": b"{}", "model.safetensors": save({"w": torch.ones(1)})}
    hub_env.add_repo("org/secret", files, private=True, token="hf_right")
    hub_env.add_repo("org/other", files, private=True, token="hf_other")
    with pytest.raises(WeightsDownloadError, match="HUGGING_FACE_HUB_TOKEN"):
        download_weights("org/secret")

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_wrong")
    with pytest.raises(WeightsDownloadError, match="rejected the token.*HUGGING_FACE_HUB_TOKEN"):
        download_weights("org/secret")

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_other")  # valid, but for another repo
    with pytest.raises(WeightsDownloadError, match="no read access"):
        download_weights("org/secret")

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_right")
    path = download_weights("org/secret")
    assert (path / "model.safetensors").is_file()

    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN")
    assert (download_weights("org/other", token="hf_other") / "config.json").is_file()


def test_gated_repo(hub_env) -> None:
    files = {"config.json": b"{}", "model.safetensors": save({"w": torch.ones(1)})}
    hub_env.add_repo("org/gated", files, gated=True, token="hf_granted")
    hub_env.add_repo("org/any", files, private=True, token="hf_someone")
    with pytest.raises(WeightsDownloadError, match="gated.*HUGGING_FACE_HUB_TOKEN"):
        download_weights("org/gated")
    with pytest.raises(WeightsDownloadError, match=r"gated .*\(403\)"):
        download_weights("org/gated", token="hf_someone")
    assert (download_weights("org/gated", token="hf_granted") / "model.safetensors").is_file()


def test_missing_repo_revision_and_weights(hub_env) -> None:
    with pytest.raises(WeightsDownloadError, match="org/nope not found"):
        download_weights("org/nope")
    hub_env.add_repo("org/empty", {"config.json": b"{}", "README.md": b"hi"})
    with pytest.raises(WeightsDownloadError, match="no weights"):
        download_weights("org/empty")
    with pytest.raises(WeightsDownloadError, match="revision not found"):
        download_weights("org/empty", revision="v9")
    with pytest.raises(WeightsDownloadError, match="nor a valid hub model id"):
        download_weights("org/too/many")


def test_offline_and_unreachable_use_the_cache(hub_env, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_env.add_repo("org/cached", {**SUPPORT, "model.safetensors": save({"w": torch.ones(3)})})
    path = download_weights("org/cached")
    hub_env.stop()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_weights("org/cached") == path
    with pytest.raises(WeightsDownloadError, match="not in the hub cache.*HF_HUB_OFFLINE"):
        download_weights("org/never-downloaded")

    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, but the hub is down: the cached copy still serves
    assert download_weights("org/cached") == path
    with pytest.raises(WeightsDownloadError, match="cannot reach the hub"):
        download_weights("org/never-downloaded")


def test_settings_from_environment_at_import(fake_hub, tmp_path: Path) -> None:
    """In a fresh process huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import; both paths work."""
    fake_hub.add_repo("org/proc", {"config.json": b"{}", "model.safetensors": save({"w": torch.ones(1)})})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {
        "HF_ENDPOINT": fake_hub.url,
        "HUGGINGFACE_HUB_CACHE": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    code = "import sys; from lorax_server.utils import hub; print(hub.download_weights(sys.argv[1]))"

    def run(extra: dict[str, str]) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code, "org/proc"],
            env=env | extra, cwd=SERVER_DIR, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    online = run({})
    assert Path(online).is_relative_to(tmp_path / "cache")
    fake_hub.stop()
    assert run({"HF_HUB_OFFLINE": "1"}) == online
