"""fetch_adapter from the fake Hub (tests/fake_hub.py), local directories and a moto S3 server: no network."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from lorax_server.adapters import sources
from lorax_server.adapters.sources import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_SAFETENSORS,
    AdapterFetchError,
    AdapterSource,
    fetch_adapter,
    parse_s3_id,
)

HUB_NOISE = {  # files an adapter repo may hold that a server never needs
    "README.md": b"# adapter card",
    "tokenizer.json": b'{"version": "1.0"}',
    "training_args.bin": b"\0" * 64,
    "checkpoint-10/adapter_model.safetensors": b"\0" * 64,
}


def _bin(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a non-zero LoRA adapter of a tiny random Llama, saved by peft."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("peft_adapter")
    peft.get_peft_model(model, lora).save_pretrained(out)
    return {name: (out / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_SAFETENSORS)}


def _bin_only(files: dict[str, bytes]) -> dict[str, bytes]:
    state = {k: v.clone() for k, v in _tensors(files[ADAPTER_SAFETENSORS]).items()}
    return {ADAPTER_CONFIG: files[ADAPTER_CONFIG], ADAPTER_BIN: _bin(state)}


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _assert_same_adapter(folder: Path, files: dict[str, bytes]) -> None:
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"
    expected = _tensors(files[ADAPTER_SAFETENSORS])
    loaded = load_file(folder / ADAPTER_SAFETENSORS)
    assert set(loaded) == set(expected) and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor)
    assert any(t.abs().sum() > 0 for name, t in loaded.items() if "lora_B" in name)  # init_lora_weights=False


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _fetch_error(*args, **kwargs) -> AdapterFetchError:
    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter(*args, **kwargs)
    return info.value


def _resolve_gets(hub, start: int = 0) -> list[str]:
    return [p for m, p in hub.requests[start:] if m == "GET" and "/resolve/" in p]


# Sources and errors -------------------------------------------------------------------------------


def test_adapter_source_names_and_proto_values() -> None:
    assert [s.value for s in AdapterSource] == ["hub", "local", "s3"]
    assert [AdapterSource.from_proto(i) for i in range(3)] == list(AdapterSource)
    assert AdapterSource.parse(" S3 ") is AdapterSource.S3
    assert AdapterSource.parse(AdapterSource.LOCAL) is AdapterSource.LOCAL
    with pytest.raises(AdapterFetchError, match="unknown adapter_source 'pbase'") as info:
        AdapterSource.parse("pbase")
    assert info.value.kind == "invalid"
    with pytest.raises(AdapterFetchError, match="enum value 7"):
        AdapterSource.from_proto(7)


def test_the_source_stays_one_enum_from_the_proto_to_the_fetcher() -> None:
    from lorax_server.adapters.manager import AdapterRequest
    from lorax_server.pb import generate_pb2 as pb
    from lorax_server.server import adapter_request

    params = pb.AdapterParameters(adapter_ids=["org/a"])
    assert adapter_request(params, pb.AdapterSource.S3, None).source is AdapterSource.S3
    assert adapter_request(params, pb.AdapterSource.LOCAL, "t").source is AdapterSource.LOCAL
    with pytest.raises(AdapterFetchError, match="enum value 9"):
        adapter_request(params, 9, None)
    assert AdapterRequest(ids=("a",), source="LOCAL").source is AdapterSource.LOCAL  # LoRAX's strings
    assert AdapterRequest(ids=("a",)).key == AdapterRequest(ids=("a",), source="hub").key


def test_fetch_error_kind_and_pickling() -> None:
    err = pickle.loads(pickle.dumps(AdapterFetchError("forbidden", "no")))
    assert (err.kind, str(err)) == ("forbidden", "no")
    with pytest.raises(ValueError):
        AdapterFetchError("teapot", "?")
    assert _fetch_error(" ", "local").kind == "invalid"


# File checks (through local directories) ----------------------------------------------------------


def test_local_adapter(peft_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write(tmp_path / "adapters" / "mine", peft_adapter)
    assert fetch_adapter(str(folder), AdapterSource.LOCAL) == folder
    monkeypatch.chdir(tmp_path)
    assert fetch_adapter("adapters/mine", "local") == folder.resolve()
    _assert_same_adapter(folder, peft_adapter)


def test_local_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    err = _fetch_error(str(tmp_path / "nope"), AdapterSource.LOCAL)
    assert err.kind == "not_found" and str(tmp_path / "nope") in str(err)
    monkeypatch.chdir(tmp_path)
    err = _fetch_error("rel/nope", AdapterSource.LOCAL)
    assert err.kind == "not_found" and str(tmp_path / "rel" / "nope") in str(err)
    (tmp_path / "file").write_text("x")
    assert _fetch_error("file", AdapterSource.LOCAL).kind == "invalid"


def test_local_bin_only_converted_once(peft_adapter, tmp_path: Path) -> None:
    folder = _write(tmp_path / "bin", _bin_only(peft_adapter))
    fetch_adapter(str(folder), AdapterSource.LOCAL)
    _assert_same_adapter(folder, peft_adapter)
    mtime = (folder / ADAPTER_SAFETENSORS).stat().st_mtime_ns
    fetch_adapter(str(folder), AdapterSource.LOCAL)
    assert (folder / ADAPTER_SAFETENSORS).stat().st_mtime_ns == mtime


def test_concurrent_fetches_convert_once(peft_adapter, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    folder = _write(tmp_path / "bin", _bin_only(peft_adapter))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: fetch_adapter(str(folder), "local"), range(8)))
    assert results == [folder] * 8
    _assert_same_adapter(folder, peft_adapter)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_hub_source_accepts_a_local_directory(peft_adapter, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _write(tmp_path / "org" / "lora", peft_adapter)
    monkeypatch.chdir(tmp_path)
    assert fetch_adapter("org/lora", AdapterSource.HUB) == folder


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _bad_adapters(peft: dict[str, bytes], tmp: Path) -> dict[str, tuple[dict[str, bytes], str]]:
    config = json.loads(peft[ADAPTER_CONFIG])
    weights = peft[ADAPTER_SAFETENSORS]
    return {
        "missing config": ({ADAPTER_SAFETENSORS: weights}, "has no adapter_config.json: it is not a PEFT adapter"),
        "config not json": ({ADAPTER_CONFIG: b"{peft", ADAPTER_SAFETENSORS: weights}, "is not valid JSON"),
        "config not object": ({ADAPTER_CONFIG: b"[]", ADAPTER_SAFETENSORS: weights}, "not a JSON object"),
        "ia3": (
            {ADAPTER_CONFIG: json.dumps(config | {"peft_type": "IA3"}).encode(), ADAPTER_SAFETENSORS: weights},
            "only LoRA adapters are supported, got peft_type IA3",
        ),
        "missing weights": ({ADAPTER_CONFIG: peft[ADAPTER_CONFIG]}, "has no weights"),
        "truncated safetensors": (
            {ADAPTER_CONFIG: peft[ADAPTER_CONFIG], ADAPTER_SAFETENSORS: weights[:-7]},
            "adapter_model.safetensors is not a valid safetensors file: .*incomplete",
        ),
        "garbage safetensors": (
            {ADAPTER_CONFIG: peft[ADAPTER_CONFIG], ADAPTER_SAFETENSORS: b"not safetensors at all"},
            "adapter_model.safetensors is not a valid safetensors file",
        ),
        "empty safetensors": ({ADAPTER_CONFIG: peft[ADAPTER_CONFIG], ADAPTER_SAFETENSORS: save({})}, "no tensors"),
        "malicious bin": (
            {ADAPTER_CONFIG: peft[ADAPTER_CONFIG], ADAPTER_BIN: _bin({"w": _Exploit(tmp / "pwned")})},
            "cannot convert adapter_model.bin: refusing.*weights_only",
        ),
    }


BAD_CASES = [
    "missing config", "config not json", "config not object", "ia3", "missing weights",
    "truncated safetensors", "garbage safetensors", "empty safetensors", "malicious bin",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_adapter_files_refused(peft_adapter, tmp_path: Path, case: str) -> None:
    files, message = _bad_adapters(peft_adapter, tmp_path)[case]
    folder = _write(tmp_path / "bad", files)
    err = _fetch_error(str(folder), "local")
    assert err.kind == "invalid"
    assert str(folder) in str(err)
    with pytest.raises(AdapterFetchError, match=message):
        fetch_adapter(str(folder), "local")
    assert not (tmp_path / "pwned").exists()


# Hub ----------------------------------------------------------------------------------------------


def test_hub_adapter_fetches_only_adapter_files_once(hub_env, peft_adapter, tmp_path: Path) -> None:
    files = {**peft_adapter, **HUB_NOISE, ADAPTER_BIN: _bin_only(peft_adapter)[ADAPTER_BIN]}
    hub_env.add_repo("org/lora", files)
    folder = fetch_adapter("org/lora", AdapterSource.HUB)
    assert folder.is_relative_to(tmp_path / "cache")
    assert hub_env.downloaded("org/lora") == {ADAPTER_CONFIG, ADAPTER_SAFETENSORS}
    assert sorted(os.listdir(folder)) == [ADAPTER_CONFIG, ADAPTER_SAFETENSORS]
    _assert_same_adapter(folder, peft_adapter)

    before = len(hub_env.requests)
    assert fetch_adapter("org/lora", "hub", revision="main") == folder
    assert not _resolve_gets(hub_env, before)


def test_hub_and_s3_adapters_bring_their_chat_template_files(hub_env, s3, peft_adapter) -> None:
    """The files that may hold the adapter's own chat template come along (top level only)."""
    template_files = {
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}", "bos_token": "<s>"}).encode(),
        "special_tokens_map.json": b'{"eos_token": "</s>"}',
        "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    }
    nested = {f"checkpoint-10/{name}": data for name, data in template_files.items()}
    hub_env.add_repo("org/chatty", {**peft_adapter, **HUB_NOISE, **template_files, **nested})
    _upload(s3, "loras/chatty", {**peft_adapter, "README.md": b"card", **template_files, **nested})
    expected = sorted([ADAPTER_CONFIG, ADAPTER_SAFETENSORS, *template_files])
    for adapter_id, source in [("org/chatty", "hub"), (f"s3://{s3.bucket}/loras/chatty", "s3")]:
        folder = fetch_adapter(adapter_id, source)
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == expected, source
        for name, data in template_files.items():
            assert (folder / name).read_bytes() == data
    assert hub_env.downloaded("org/chatty") == set(expected)

    # A template file removed from the bucket is removed from the cached copy too.
    s3.delete_object(Bucket=s3.bucket, Key="loras/chatty/chat_template.jinja")
    folder = fetch_adapter(f"s3://{s3.bucket}/loras/chatty", "s3")
    assert not (folder / "chat_template.jinja").exists()


def test_hub_private_adapter_token_per_request(hub_env, peft_adapter, monkeypatch) -> None:
    hub_env.add_repo("org/secret", peft_adapter, private=True, token="hf_right")
    hub_env.add_repo("org/other", peft_adapter, private=True, token="hf_other")

    err = _fetch_error("org/secret", "hub")
    assert err.kind == "unauthorized" and "api_token" in str(err)
    err = _fetch_error("org/secret", "hub", api_token="hf_wrong")
    assert err.kind == "unauthorized" and "rejected the token" in str(err) and "api_token" in str(err)
    err = _fetch_error("org/secret", "hub", api_token="hf_other")  # valid, for another repo: the Hub says 404
    assert err.kind == "not_found" and "api_token given has no read access" in str(err)

    folder = fetch_adapter("org/secret", "hub", api_token="hf_right")
    _assert_same_adapter(folder, peft_adapter)
    # The token served that request only: nothing process-wide remembers it.
    assert "hf_right" not in os.environ.values()
    assert _fetch_error("org/secret", "hub").kind == "unauthorized"

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_right")  # the server's token, overridable per request
    assert fetch_adapter("org/secret", "hub") == folder
    assert _fetch_error("org/secret", "hub", api_token="hf_other").kind == "not_found"
    # A token the hub rejects outright counts as no token: the server's credentials apply, as they
    # would had the request sent none.
    assert fetch_adapter("org/secret", "hub", api_token="hf_wrong") == folder


def test_hub_public_adapter_with_a_placeholder_token(hub_env, peft_adapter) -> None:
    """OpenAI clients send their api_key (often "EMPTY") as the bearer token, which becomes the
    request's api_token: a public adapter is still fetched."""
    hub_env.add_repo("org/public", peft_adapter)
    _assert_same_adapter(fetch_adapter("org/public", "hub", api_token="EMPTY"), peft_adapter)


def test_hub_gated_adapter(hub_env, peft_adapter) -> None:
    hub_env.add_repo("org/gated", peft_adapter, gated=True, token="hf_granted")
    hub_env.add_repo("org/any", peft_adapter, private=True, token="hf_someone")
    err = _fetch_error("org/gated", "hub")
    assert err.kind == "unauthorized" and "gated" in str(err) and "api_token" in str(err)
    err = _fetch_error("org/gated", "hub", api_token="hf_someone")
    assert err.kind == "forbidden" and "403" in str(err)
    assert (fetch_adapter("org/gated", "hub", api_token="hf_granted") / ADAPTER_SAFETENSORS).is_file()


def test_hub_missing_repo_revision_files(hub_env, peft_adapter) -> None:
    err = _fetch_error("org/nope", "hub")
    assert err.kind == "not_found" and "org/nope not found" in str(err)
    hub_env.add_repo("org/lora", peft_adapter)
    err = _fetch_error("org/lora", "hub", revision="v9")
    assert err.kind == "not_found" and "revision not found" in str(err)
    err = _fetch_error("org/too/many/parts", "hub")
    assert err.kind == "invalid" and "adapter_source local" in str(err)

    hub_env.add_repo("org/model", {"config.json": b"{}", "model.safetensors": peft_adapter[ADAPTER_SAFETENSORS]})
    err = _fetch_error("org/model", "hub")
    assert err.kind == "invalid" and "has no adapter_config.json" in str(err)
    hub_env.add_repo("org/config-only", {ADAPTER_CONFIG: peft_adapter[ADAPTER_CONFIG], **HUB_NOISE})
    err = _fetch_error("org/config-only", "hub")
    assert err.kind == "invalid" and "has no weights" in str(err)
    assert not _resolve_gets(hub_env)  # refused from the listing, before any download


def test_hub_bin_only_adapter_converted_once(hub_env, peft_adapter) -> None:
    hub_env.add_repo("org/bin", {**_bin_only(peft_adapter), "training_args.bin": _bin({"lr": 1.0})})
    folder = fetch_adapter("org/bin", "hub")
    assert hub_env.downloaded("org/bin") == {ADAPTER_CONFIG, ADAPTER_BIN}
    _assert_same_adapter(folder, peft_adapter)
    mtime = (folder / ADAPTER_SAFETENSORS).stat().st_mtime_ns
    before = len(hub_env.requests)
    assert fetch_adapter("org/bin", "hub") == folder
    assert (folder / ADAPTER_SAFETENSORS).stat().st_mtime_ns == mtime
    assert not _resolve_gets(hub_env, before)


def test_hub_non_lora_and_corrupt_adapters_refused(hub_env, peft_adapter) -> None:
    config = json.loads(peft_adapter[ADAPTER_CONFIG]) | {"peft_type": "PREFIX_TUNING"}
    hub_env.add_repo("org/prefix", {**peft_adapter, ADAPTER_CONFIG: json.dumps(config).encode()})
    err = _fetch_error("org/prefix", "hub")
    assert err.kind == "invalid" and "only LoRA adapters are supported, got peft_type PREFIX_TUNING" in str(err)

    corrupt = peft_adapter[ADAPTER_SAFETENSORS][:-10]
    hub_env.add_repo("org/corrupt", {**peft_adapter, ADAPTER_SAFETENSORS: corrupt})
    err = _fetch_error("org/corrupt", "hub")
    assert err.kind == "invalid" and "org/corrupt" in str(err)
    assert "adapter_model.safetensors is not a valid safetensors file: " in str(err)


def test_hub_offline_and_unreachable_use_the_cache(hub_env, peft_adapter, monkeypatch) -> None:
    hub_env.add_repo("org/lora", peft_adapter)
    hub_env.add_repo("org/secret", peft_adapter, private=True, token="hf_right")
    folder = fetch_adapter("org/lora", "hub")
    secret = fetch_adapter("org/secret", "hub", api_token="hf_right")
    hub_env.stop()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_adapter("org/lora", "hub") == folder
    err = _fetch_error("org/never", "hub")
    assert err.kind == "unavailable" and "HF_HUB_OFFLINE" in str(err)

    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, but the hub is down
    assert fetch_adapter("org/lora", "hub") == folder
    assert _fetch_error("org/never", "hub").kind == "unavailable"
    # A private adapter's cached copy serves only a token it was downloaded with.
    assert fetch_adapter("org/secret", "hub", api_token="hf_right") == secret
    assert _fetch_error("org/secret", "hub").kind == "unauthorized"
    assert _fetch_error("org/secret", "hub", api_token="hf_guess").kind == "forbidden"


# S3 -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A boto3 client of the moto server, with the environment fetch_adapter reads pointed at it."""
    for var in ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    client = sources._s3_client()
    bucket = f"adapters-{tmp_path.name.replace('_', '-').lower()[-40:]}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


def _upload(client, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=client.bucket, Key=f"{prefix}/{name}", Body=data)


def test_s3_adapter_fetched_once_and_refreshed(s3, peft_adapter, tmp_path: Path, monkeypatch) -> None:
    _upload(s3, "loras/tiny", {**peft_adapter, "README.md": b"card", "nested/adapter_model.bin": b"x"})
    folder = fetch_adapter(f"s3://{s3.bucket}/loras/tiny", AdapterSource.S3)
    assert folder == tmp_path / "cache" / "s3" / s3.bucket / "loras" / "tiny"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        ADAPTER_CONFIG,
        ADAPTER_SAFETENSORS,
    ]
    _assert_same_adapter(folder, peft_adapter)

    downloads: list[str] = []
    real_client = sources._s3_client

    def counting_client():
        client = real_client()
        download_file = client.download_file
        client.download_file = lambda bucket, key, path: (downloads.append(key), download_file(bucket, key, path))
        return client

    monkeypatch.setattr(sources, "_s3_client", counting_client)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert fetch_adapter(f"{s3.bucket}/loras/tiny/", "s3") == folder  # served from the cache
    assert downloads == [] and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

    config = json.loads(peft_adapter[ADAPTER_CONFIG]) | {"lora_dropout": 0.5}
    _upload(s3, "loras/tiny", {ADAPTER_CONFIG: json.dumps(config).encode()})  # new ETag: fetched again
    fetch_adapter(f"s3://{s3.bucket}/loras/tiny", "s3")
    assert downloads == ["loras/tiny/adapter_config.json"]
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["lora_dropout"] == 0.5

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # S3 unreachable: the cache serves
    assert fetch_adapter(f"s3://{s3.bucket}/loras/tiny", "s3") == folder
    err = _fetch_error(f"s3://{s3.bucket}/loras/other", "s3")
    assert err.kind == "unavailable"


def test_s3_missing_bucket_key_and_bad_adapters(s3, peft_adapter) -> None:
    err = _fetch_error(f"s3://{s3.bucket}/loras/absent", "s3")
    assert err.kind == "not_found" and f"s3://{s3.bucket}/loras/absent" in str(err)
    err = _fetch_error("s3://no-such-bucket-here/loras/tiny", "s3")
    assert err.kind == "not_found" and "NoSuchBucket" in str(err)

    _upload(s3, "weights-only", {ADAPTER_SAFETENSORS: peft_adapter[ADAPTER_SAFETENSORS]})
    err = _fetch_error(f"s3://{s3.bucket}/weights-only", "s3")
    assert err.kind == "invalid" and "has no adapter_config.json" in str(err)
    _upload(s3, "corrupt", {**peft_adapter, ADAPTER_SAFETENSORS: b"junk"})
    err = _fetch_error(f"s3://{s3.bucket}/corrupt", "s3")
    assert err.kind == "invalid" and "not a valid safetensors file" in str(err)


def test_s3_bin_only_adapter_converted(s3, peft_adapter) -> None:
    _upload(s3, "bin", _bin_only(peft_adapter))
    folder = fetch_adapter(f"s3://{s3.bucket}/bin", "s3")
    _assert_same_adapter(folder, peft_adapter)
    # A new .bin upload replaces the converted weights rather than leaving the old ones behind.
    doubled = {k: v * 2 for k, v in _tensors(peft_adapter[ADAPTER_SAFETENSORS]).items()}
    _upload(s3, "bin", {ADAPTER_BIN: _bin(doubled)})
    fetch_adapter(f"s3://{s3.bucket}/bin", "s3")
    for name, tensor in load_file(folder / ADAPTER_SAFETENSORS).items():
        torch.testing.assert_close(tensor, doubled[name])
    shutil.rmtree(folder)


@pytest.mark.parametrize(
    ("adapter_id", "expected"),
    [
        ("s3://bucket/a/b", ("bucket", "a/b")),
        ("S3://bucket/a/b/", ("bucket", "a/b")),
        ("bucket/adapter", ("bucket", "adapter")),
        ("s3://bucket", ("bucket", "")),
        ("s3://", None),
        ("s3://bucket/../../etc", None),
        ("bucket/a//b", None),
        ("s3://bu cket/a", None),
        ("../bucket/a", None),
    ],
)
def test_parse_s3_id(adapter_id: str, expected: tuple[str, str] | None) -> None:
    if expected is None:
        with pytest.raises(AdapterFetchError) as info:
            parse_s3_id(adapter_id)
        assert info.value.kind == "invalid"
    else:
        assert parse_s3_id(adapter_id) == expected


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("NoSuchBucket", "not_found"),
        ("NoSuchKey", "not_found"),
        ("404", "not_found"),
        ("AccessDenied", "forbidden"),
        ("403", "forbidden"),
        ("InvalidAccessKeyId", "unauthorized"),
        ("SignatureDoesNotMatch", "unauthorized"),
        ("SlowDown", "unavailable"),
    ],
)
def test_s3_error_kinds(code: str, kind: str) -> None:
    from botocore.exceptions import ClientError

    err = ClientError({"Error": {"Code": code, "Message": "m"}}, "ListObjectsV2")
    mapped = sources._s3_error(err, "adapter s3://b/p")
    assert mapped.kind == kind and "s3://b/p" in str(mapped)
