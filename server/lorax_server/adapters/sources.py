"""Fetch a LoRA adapter to a local directory from the Hub, a local path or S3, and check its files.

``fetch_adapter(adapter_id, source, api_token, revision)`` returns a directory holding
``adapter_config.json`` and ``adapter_model.safetensors`` (a ``.bin``-only adapter is converted once,
read with ``torch.load(weights_only=True)``). Every failure is an ``AdapterFetchError`` whose ``kind``
the router maps to an HTTP status: ``not_found`` 404, ``unauthorized`` 401, ``forbidden`` 403,
``invalid`` 422, ``unavailable`` 424. The adapter's own chat template files (``tokenizer_config.json``,
``special_tokens_map.json``, ``chat_template.jinja``) come along when the adapter has them.

- **hub**: ``utils.hub.fetch_snapshot`` (the Hub client model downloads use too), with the settings
  of ``HubSettings.from_env()`` read at call time (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``,
  ``HF_HUB_CACHE``); only the adapter files are downloaded, into the hub cache. A request's
  ``api_token`` is passed to that request's calls only; without one the server's
  ``HUGGING_FACE_HUB_TOKEN``/``HF_TOKEN`` is used. When the Hub is offline or unreachable the cached
  copy is used, but a private adapter's cached copy only with a token it was downloaded with.
- **local**: an existing directory, absolute or relative to the working directory (a hub id that
  names an existing directory is read from there too, as LoRAX does).
- **s3**: ``s3://bucket/prefix`` or ``bucket/prefix``, fetched with ``boto3`` (endpoint from
  ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``/``S3_ENDPOINT_URL``, credentials from the standard AWS
  chain, unsigned requests when there are none) into ``<hub cache>/s3/<bucket>/<prefix>``. A manifest
  of the objects' ETags and sizes makes a complete cached copy skip the download.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorax_server.adapters.chat_template import TEMPLATE_FILES
from lorax_server.adapters.medusa import MEDUSA_CONFIG, MEDUSA_WEIGHTS, MedusaError, medusa_config
from lorax_server.adapters.tensor_file import TensorFileError, tensor_names
from lorax_server.utils.convert import ConversionError, convert_file
from lorax_server.utils.hub import FetchError, HubSettings, RepoKind, fetch_snapshot

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
MEDUSA_FILES = (MEDUSA_CONFIG, MEDUSA_WEIGHTS)  # Medusa heads, alone or beside a LoRA adapter
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_BIN, *MEDUSA_FILES)

TOKEN_HINT = "pass an api_token with read access to it (or set HUGGING_FACE_HUB_TOKEN on the server)"
ACCESS_RECORD = "lorax_access.json"  # beside snapshots/ in a private hub adapter's cache folder
S3_MANIFEST = ".lorax-s3-manifest.json"


class AdapterSource(enum.Enum):
    """Where an adapter comes from; values are LoRAX's ``adapter_source`` strings."""

    HUB = "hub"
    LOCAL = "local"
    S3 = "s3"

    @classmethod
    def parse(cls, name: str | AdapterSource) -> AdapterSource:
        """``"hub"``/``"local"``/``"s3"`` in any case; raises ``AdapterFetchError`` (invalid) otherwise."""
        if isinstance(name, AdapterSource):
            return name
        try:
            return cls(str(name).strip().lower())
        except ValueError:
            expected = ", ".join(s.value for s in cls)
            raise AdapterFetchError("invalid", f"unknown adapter_source {name!r}: expected one of {expected}") from None

    @classmethod
    def from_proto(cls, value: int) -> AdapterSource:
        """The proto enum ``generate.v1.AdapterSource``: HUB = 0, LOCAL = 1, S3 = 2."""
        try:
            return _PROTO_SOURCES[value]
        except KeyError:
            raise AdapterFetchError("invalid", f"unknown adapter_source enum value {value}") from None


_PROTO_SOURCES = {0: AdapterSource.HUB, 1: AdapterSource.LOCAL, 2: AdapterSource.S3}


class AdapterFetchError(FetchError):
    """An adapter could not be made available locally; ``kind`` says how the router should answer."""


def fetch_adapter(
    adapter_id: str,
    source: AdapterSource | str,
    api_token: str | None = None,
    revision: str | None = None,
) -> Path:
    """A local directory holding ``adapter_id``'s ``adapter_config.json`` and ``adapter_model.safetensors``.

    Downloads are cached on disk: fetching the same adapter again downloads nothing. ``api_token``
    is used for this call only. ``revision`` applies to the hub (a branch, tag or commit). Raises
    ``AdapterFetchError``.
    """
    source = AdapterSource.parse(source)
    if not adapter_id or not adapter_id.strip():
        raise AdapterFetchError("invalid", "adapter_id is empty")
    return _FETCHERS[source](adapter_id.strip(), api_token or None, revision or None)


# File checks --------------------------------------------------------------------------------------


def ensure_adapter_files(folder: Path, where: str) -> None:
    """Check ``folder`` holds a LoRA adapter in PEFT layout, converting ``adapter_model.bin`` once.

    Checks the files only (a LoRA ``peft_type``, readable safetensors), not whether the adapter fits
    a base model. A folder of Medusa heads alone (LoRAX's format) passes too. Raises
    ``AdapterFetchError`` (invalid).
    """
    if not (folder / ADAPTER_CONFIG).is_file():
        try:
            medusa = medusa_config(folder)
        except MedusaError as err:
            raise AdapterFetchError("invalid", f"{where}: {err}") from err
        if medusa is not None:
            return
    _check_config(folder / ADAPTER_CONFIG, where)
    weights = folder / ADAPTER_SAFETENSORS
    if not weights.is_file():
        if not (folder / ADAPTER_BIN).is_file():
            raise AdapterFetchError(
                "invalid", f"{where} has no weights: neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN}"
            )
        _convert_bin(folder / ADAPTER_BIN, weights, where)
    try:
        names = tensor_names(weights)
    except (TensorFileError, OSError) as err:
        raise AdapterFetchError(
            "invalid", f"{where}: {ADAPTER_SAFETENSORS} is not a valid safetensors file: {err}"
        ) from err
    if not names:
        raise AdapterFetchError("invalid", f"{where}: {ADAPTER_SAFETENSORS} holds no tensors")


def _check_config(path: Path, where: str) -> None:
    if not path.is_file():
        raise AdapterFetchError("invalid", f"{where} has no {ADAPTER_CONFIG}: it is not a PEFT adapter")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AdapterFetchError("invalid", f"{where}: {ADAPTER_CONFIG} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterFetchError("invalid", f"{where}: {ADAPTER_CONFIG} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()  # PEFT always writes it; LORA if absent
    if peft_type != "LORA":
        raise AdapterFetchError("invalid", f"{where}: only LoRA adapters are supported, got peft_type {peft_type}")


def _convert_bin(bin_path: Path, target: Path, where: str) -> None:
    if not os.access(bin_path.parent, os.W_OK):
        raise AdapterFetchError(
            "invalid",
            f"{where} holds only {ADAPTER_BIN} and {bin_path.parent} is not writable, so it cannot be "
            f"converted to {ADAPTER_SAFETENSORS}: copy the adapter to a writable directory",
        )
    with _lock_for(target):  # threads of one process share the temporary file name
        if target.is_file():
            return
        logger.info("converting %s of %s to safetensors", ADAPTER_BIN, where)
        try:
            convert_file(bin_path, target)
        except (ConversionError, OSError) as err:
            raise AdapterFetchError("invalid", f"{where}: cannot convert {ADAPTER_BIN}: {err}") from err


_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    """One lock per path, so threads of this process do not download or convert the same files at once."""
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def _write_json_atomically(target: Path, data: object) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# Local directories --------------------------------------------------------------------------------


def _fetch_local(adapter_id: str, api_token: str | None, revision: str | None) -> Path:
    folder = Path(adapter_id).expanduser()
    shown = adapter_id if folder.is_absolute() else f"{adapter_id} ({folder.absolute()})"
    if not folder.exists():
        raise AdapterFetchError("not_found", f"local adapter directory {shown} does not exist")
    if not folder.is_dir():
        raise AdapterFetchError("invalid", f"local adapter path {shown} is not a directory")
    folder = folder.resolve()
    ensure_adapter_files(folder, f"local adapter {adapter_id}")
    return folder


# Hugging Face Hub ---------------------------------------------------------------------------------

ADAPTER = RepoKind(
    label="adapter ",
    marker=ADAPTER_CONFIG,
    invalid_id="is not a valid hub repo id: for a directory use adapter_source local",
    token_name="api_token",
    token_hint=TOKEN_HINT,
    token_fix="pass a valid api_token",
    error=AdapterFetchError,
)


def _fetch_hub(adapter_id: str, api_token: str | None, revision: str | None) -> Path:
    if Path(adapter_id).expanduser().is_dir():  # like LoRAX: a local directory needs no download
        return _fetch_local(adapter_id, api_token, revision)
    settings = HubSettings.from_env()
    try:
        folder = _hub_snapshot(adapter_id, revision, settings, api_token or settings.token)
    except AdapterFetchError as rejected:
        if settings.offline or rejected.kind != "unauthorized" or not api_token or api_token == settings.token:
            raise
        # The hub refused the request's token outright (OpenAI clients send their api_key, often a
        # placeholder, as the bearer token): fetch as a request without a token would. That reaches
        # nothing the request could not reach by leaving the token out.
        try:
            folder = _hub_snapshot(adapter_id, revision, settings, settings.token)
        except AdapterFetchError:
            raise rejected from None
    ensure_adapter_files(folder, ADAPTER.where(adapter_id, revision))
    return folder


def _hub_snapshot(adapter_id: str, revision: str | None, settings: HubSettings, token: str | None) -> Path:
    """The adapter's files from the hub (or its cache), with the access rule for private adapters."""
    where = ADAPTER.where(adapter_id, revision)

    def select(repo_files: list[str]) -> list[str]:
        files = select_adapter_files(repo_files)
        hub = settings.endpoint
        if ADAPTER_CONFIG not in files:
            raise AdapterFetchError("invalid", f"{where} on {hub} has no {ADAPTER_CONFIG}: it is not a PEFT adapter")
        if ADAPTER_SAFETENSORS not in files and ADAPTER_BIN not in files:
            raise AdapterFetchError(
                "invalid", f"{where} on {hub} has no weights: neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN}"
            )
        return files

    snapshot = fetch_snapshot(ADAPTER, adapter_id, revision, settings, token, select)
    record = snapshot.folder.parents[1] / ACCESS_RECORD  # beside snapshots/, one per repo
    if snapshot.from_cache:
        _check_cached_access(record, adapter_id, token, where, settings.endpoint)
    elif snapshot.private:
        _remember_token(record, adapter_id, token)
    return snapshot.folder


def select_adapter_files(repo_files: list[str]) -> list[str]:
    """The files to fetch (top level): the config, the safetensors weights, else the ``.bin`` ones, and
    the chat template files present."""
    present = set(repo_files)
    weights = ADAPTER_SAFETENSORS if ADAPTER_SAFETENSORS in present else ADAPTER_BIN
    return [name for name in (ADAPTER_CONFIG, weights, *MEDUSA_FILES, *TEMPLATE_FILES) if name in present]


def _check_cached_access(record: Path, adapter_id: str, token: str | None, where: str, hub: str) -> None:
    """A private adapter's cached copy serves only tokens it was downloaded with (the hub cannot be
    asked whether another token may read it)."""
    if record.is_file() and _token_digest(adapter_id, token) not in _read_access_record(record):
        raise AdapterFetchError(
            "unauthorized" if not token else "forbidden",
            f"{where} is private and the hub at {hub} cannot be asked whether the "
            "token may read it: only a token it was downloaded with may use the cached copy; "
            f"{TOKEN_HINT}",
        )


def _remember_token(record: Path, adapter_id: str, token: str | None) -> None:
    """Record (a digest of) a token that may read this private adapter, for use when offline."""
    digests = _read_access_record(record) | {_token_digest(adapter_id, token)}
    try:
        _write_json_atomically(record, {"token_sha256": sorted(digests)})
    except OSError as err:  # a read-only cache still serves online requests
        logger.warning("cannot record access to private adapter %s: %s", adapter_id, err)


def _read_access_record(record: Path) -> set[str]:
    try:
        return set(json.loads(record.read_text())["token_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _token_digest(adapter_id: str, token: str | None) -> str:
    return hashlib.sha256(f"{adapter_id}\0{token or ''}".encode()).hexdigest()


# S3 -----------------------------------------------------------------------------------------------

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_s3_id(adapter_id: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` or ``bucket/some/prefix`` → ``("bucket", "some/prefix")``.

    The prefix may be empty (an adapter at the bucket's root). Raises ``AdapterFetchError`` (invalid)
    for ids that could not name a bucket, or whose prefix has ``.``/``..``/empty parts.
    """
    rest = adapter_id[len("s3://") :] if adapter_id.lower().startswith("s3://") else adapter_id
    bucket, _, prefix = rest.strip("/").partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket) or bucket in (".", ".."):
        raise AdapterFetchError("invalid", f"{adapter_id!r} is not an S3 adapter id: expected s3://bucket/prefix")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise AdapterFetchError("invalid", f"S3 adapter id {adapter_id!r} has an empty, '.' or '..' path part")
    return bucket, prefix


def _fetch_s3(adapter_id: str, api_token: str | None, revision: str | None) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_id(adapter_id)
    where = f"adapter s3://{bucket}/{prefix}".rstrip("/")
    folder = Path(HubSettings.from_env().cache_name) / "s3" / bucket / prefix
    try:
        client = _s3_client()
    except ValueError as err:  # botocore: "Invalid endpoint: ..."
        raise AdapterFetchError("unavailable", f"cannot fetch {where}: {err}") from err
    with _lock_for(folder):
        try:
            remote = _list_s3_adapter(client, bucket, prefix, where)
            if _read_manifest(folder) != remote or not _cached_files_complete(folder, remote):
                _download_s3(client, bucket, prefix, remote, folder, where)
        except ClientError as err:
            raise _s3_error(err, where) from err
        except BotoCoreError as err:  # no endpoint, connection refused, timeouts, bad credentials setup
            manifest = _read_manifest(folder)
            if manifest is None or not _cached_files_complete(folder, manifest):
                raise AdapterFetchError("unavailable", f"cannot fetch {where}: {err}") from err
            logger.warning("S3 unreachable (%s); using the cached %s", err, folder)
        ensure_adapter_files(folder, where)
    return folder


def _s3_client() -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    )
    session = boto3.session.Session()
    config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    if session.get_credentials() is None:  # public buckets need no credentials
        config = config.merge(Config(signature_version=UNSIGNED))
    return session.client("s3", endpoint_url=endpoint or None, config=config)


def _list_s3_adapter(client: Any, bucket: str, prefix: str, where: str) -> dict[str, dict[str, Any]]:
    """The adapter objects directly under the prefix to fetch: ``{file name: {"etag", "size"}}``."""
    key_prefix = f"{prefix}/" if prefix else ""
    listing = client.list_objects_v2(Bucket=bucket, Prefix=key_prefix, Delimiter="/")
    objects = {
        obj["Key"][len(key_prefix) :]: {"etag": obj.get("ETag", "").strip('"'), "size": int(obj.get("Size", 0))}
        for obj in listing.get("Contents", [])
    }
    found = [name for name in ADAPTER_FILES if name in objects]
    if not found:
        raise AdapterFetchError(
            "not_found", f"{where} not found: no {ADAPTER_CONFIG} or adapter_model.* objects under that prefix"
        )
    files = select_adapter_files(list(objects))
    if ADAPTER_CONFIG not in files and MEDUSA_CONFIG not in files:
        raise AdapterFetchError("invalid", f"{where} has no {ADAPTER_CONFIG}: it is not a PEFT adapter")
    return {name: objects[name] for name in files}


def _download_s3(
    client: Any, bucket: str, prefix: str, remote: dict[str, dict[str, Any]], folder: Path, where: str
) -> None:
    """Bring ``folder`` up to date with ``remote``, fetching only the files whose ETag or size changed."""
    old = _read_manifest(folder) or {}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / S3_MANIFEST).unlink(missing_ok=True)  # incomplete until every file is in place
    for name in (*ADAPTER_FILES, *TEMPLATE_FILES):  # stale files, including a safetensors file converted from a .bin
        if name not in remote:
            (folder / name).unlink(missing_ok=True)
    for name, meta in remote.items():
        target = folder / name
        if old.get(name) == meta and target.is_file() and target.stat().st_size == meta["size"]:
            continue
        tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            client.download_file(bucket, f"{prefix}/{name}" if prefix else name, str(tmp))
            if tmp.stat().st_size != meta["size"]:
                raise AdapterFetchError("unavailable", f"{where}: {name} changed while it was downloaded; retry")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    _write_json_atomically(folder / S3_MANIFEST, remote)


def _read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    try:
        manifest = json.loads((folder / S3_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _cached_files_complete(folder: Path, manifest: dict[str, dict[str, Any]]) -> bool:
    try:
        return all((folder / name).stat().st_size == meta["size"] for name, meta in manifest.items())
    except (OSError, KeyError, TypeError):
        return False


_S3_NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_S3_UNAUTHORIZED = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
}
_S3_FORBIDDEN = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}


def _s3_error(err: Any, where: str) -> AdapterFetchError:
    """Map a botocore ``ClientError`` to an ``AdapterFetchError``."""
    error = err.response.get("Error", {}) if hasattr(err, "response") else {}
    code = str(error.get("Code", ""))
    message = error.get("Message") or str(err)
    if code in _S3_NOT_FOUND:
        return AdapterFetchError("not_found", f"{where} not found ({code}): {message}")
    if code in _S3_UNAUTHORIZED:
        return AdapterFetchError(
            "unauthorized",
            f"S3 rejected the credentials for {where} ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
        )
    if code in _S3_FORBIDDEN:
        return AdapterFetchError(
            "forbidden", f"access to {where} is denied ({code}): the server's AWS credentials cannot read it"
        )
    return AdapterFetchError("unavailable", f"fetching {where} from S3 failed ({code}): {message}")


_FETCHERS: dict[AdapterSource, Callable[[str, str | None, str | None], Path]] = {
    AdapterSource.HUB: _fetch_hub,
    AdapterSource.LOCAL: _fetch_local,
    AdapterSource.S3: _fetch_s3,
}
