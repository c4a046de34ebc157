"""The one Hugging Face Hub client of the shard: model weights and LoRA adapters both download here.

``fetch_snapshot`` is the shared path: with ``HF_HUB_OFFLINE`` the cached copy is used; otherwise the
Hub is asked for the repo's file list, the caller picks the files it needs, and those are downloaded
into the Hub cache. An unreachable Hub (connection errors, 5xx, 408, 429) falls back to the cached
copy. Every failure is a ``FetchError`` whose ``kind`` says how a caller answers it (``not_found``,
``unauthorized``, ``forbidden``, ``invalid``, ``unavailable``), worded once for models and adapters
alike; a ``RepoKind`` supplies the few words that differ.

``download_weights`` is what ``lorax-server download-weights`` runs: a local directory passes through,
a hub repo id is fetched (only the files a server needs), and ``.bin`` checkpoints are converted
once to ``.safetensors``. Hub settings (endpoint, token, offline mode, cache directory) are read from
the environment when the call is made, not when ``huggingface_hub`` is imported, so a launcher or a
test can set them at any time.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lorax_server.utils.convert import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    ConversionError,
    bin_weight_files,
    conversion_pending,
    convert_bin_to_safetensors,
    safetensors_name,
)

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"

# Top-level files a server needs besides the weights: config, tokenizer, chat template, remote code.
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "*.py",
    # sentence-transformers: which modules follow the encoder (pooling, dense, normalize).
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)

# A sentence-transformers module's directory (`1_Pooling`, `2_Dense_256`, ...) and the files of one.
_MODULE_FILE = re.compile(r"^\d+_[^/]+/(config\.json|model\.safetensors|pytorch_model\.bin)$")

# Statuses that say "try later", not "no": the cached copy serves instead, like a connection error.
_TRANSIENT = (408, 429)


class FetchError(Exception):
    """A model or adapter could not be made available locally; ``kind`` says how to answer it."""

    KINDS = ("not_found", "unauthorized", "forbidden", "invalid", "unavailable")

    def __init__(self, kind: str, message: str) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown {type(self).__name__} kind {kind!r}")
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across process pools despite two arguments
        return (type(self), (self.kind, str(self)))


class WeightsDownloadError(FetchError):
    """Model weights could not be made available locally; the message says which model and why."""


@dataclass(frozen=True)
class HubSettings:
    """How to reach the Hub, read from the environment by ``from_env``."""

    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    offline: bool = False
    cache_dir: str | None = None  # None: huggingface_hub's default (under HF_HOME)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HubSettings:
        env = os.environ if env is None else env
        offline = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
        return cls(
            endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=env.get("HUGGING_FACE_HUB_TOKEN") or env.get("HF_TOKEN") or None,
            offline=offline.strip().upper() in {"1", "ON", "YES", "TRUE"},
            cache_dir=env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or None,
        )

    @property
    def cache_name(self) -> str:
        """The Hub cache directory these settings use, for messages and for files kept beside it."""
        if self.cache_dir:
            return self.cache_dir
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class RepoKind:
    """What differs between fetching a model and an adapter: a few words of the messages, the file
    that marks a cached copy, and the error class raised."""

    label: str  # put before the repo id in messages ("" for models, "adapter " for adapters)
    marker: str  # a file every snapshot of this kind holds: how a cached copy is found
    invalid_id: str  # completes "<id> ..." when the id cannot name a hub repo
    token_name: str  # what the caller calls the token it sent
    token_hint: str  # how to supply a token with read access
    token_fix: str  # what to do when the Hub rejects the token outright
    error: type[FetchError] = FetchError

    def where(self, repo_id: str, revision: str | None) -> str:
        return f"{self.label}{repo_id}" + (f" (revision {revision})" if revision else "")


@dataclass(frozen=True)
class Snapshot:
    """A repo's files in the local Hub cache."""

    folder: Path
    from_cache: bool  # the Hub was not asked (offline) or could not be reached
    private: bool = False  # the Hub said the repo is private or gated


def fetch_snapshot(
    kind: RepoKind,
    repo_id: str,
    revision: str | None,
    settings: HubSettings,
    token: str | None,
    select: Callable[[list[str]], list[str]],
) -> Snapshot:
    """The files of ``repo_id`` that ``select`` picks from the repo's file list, in the Hub cache.

    ``select`` raises (a ``kind.error``) when the repo lacks what the caller needs. ``token`` is sent
    with this call's requests only. Raises ``kind.error``.
    """
    where = kind.where(repo_id, revision)
    if settings.offline:
        folder = cached_snapshot(kind, repo_id, revision, settings)
        if folder is None:
            raise kind.error(
                "unavailable",
                f"{where} is not in the hub cache ({settings.cache_name}) and HF_HUB_OFFLINE is set: "
                "download it once with network access, or unset HF_HUB_OFFLINE",
            )
        return Snapshot(folder, from_cache=True)
    api = HfApi(endpoint=settings.endpoint, token=token)
    try:
        # model_info: one request, no retries, so an unreachable hub falls back to the cache at once.
        info = api.model_info(repo_id, revision=revision, token=token)
        if info.siblings is not None:
            repo_files = [sibling.rfilename for sibling in info.siblings]
        else:
            repo_files = api.list_repo_files(repo_id, revision=info.sha or revision, token=token)
    except HFValidationError as err:
        raise kind.error("invalid", f"{repo_id} {kind.invalid_id} ({err})") from err
    except HfHubHTTPError as err:
        if _status(err) < 500 and _status(err) not in _TRANSIENT:
            raise hub_error(kind, err, where, settings.endpoint, token) from err
        return _from_cache_after_failure(kind, repo_id, revision, settings, err)
    except Exception as err:  # connection refused, timeout: the types depend on the HTTP backend
        return _from_cache_after_failure(kind, repo_id, revision, settings, err)

    files = select(repo_files)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=settings.cache_dir,
            token=token,
            endpoint=settings.endpoint,
            allow_patterns=[glob.escape(name) for name in files],
        )
    except HfHubHTTPError as err:
        raise hub_error(kind, err, where, settings.endpoint, token) from err
    except Exception as err:  # connection lost mid-download, disk full, ...
        raise kind.error(
            "unavailable", f"downloading {where} from {settings.endpoint} failed: {type(err).__name__}: {err}"
        ) from err
    return Snapshot(Path(folder), from_cache=False, private=bool(info.private or info.gated))


def cached_snapshot(kind: RepoKind, repo_id: str, revision: str | None, settings: HubSettings) -> Path | None:
    """The cached snapshot folder of the repo, when the cache holds its ``kind.marker`` file."""
    try:
        marker = try_to_load_from_cache(repo_id, kind.marker, cache_dir=settings.cache_dir, revision=revision)
    except HFValidationError as err:
        raise kind.error("invalid", f"{repo_id} {kind.invalid_id} ({err})") from err
    return Path(marker).parent if isinstance(marker, str) else None


def _from_cache_after_failure(
    kind: RepoKind, repo_id: str, revision: str | None, settings: HubSettings, err: Exception
) -> Snapshot:
    folder = cached_snapshot(kind, repo_id, revision, settings)
    if folder is None:
        raise kind.error(
            "unavailable",
            f"cannot reach the hub at {settings.endpoint} ({type(err).__name__}: {err}) and "
            f"{kind.where(repo_id, revision)} is not in the hub cache ({settings.cache_name})",
        ) from err
    logger.warning("hub at %s unreachable (%s); using the cached %s", settings.endpoint, err, folder)
    return Snapshot(folder, from_cache=True)


def _status(err: Exception) -> int:
    response = getattr(err, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def hub_error(kind: RepoKind, err: HfHubHTTPError, where: str, hub: str, token: str | None) -> FetchError:
    """The Hub's refusal as a ``kind.error``: what went wrong, and what the caller can do about it."""
    status, name = _status(err), kind.token_name
    if isinstance(err, GatedRepoError):
        if status == 403:
            return kind.error(
                "forbidden",
                f"{where} is gated on {hub} and the {name} given has not been granted access (403): "
                "accept its conditions on the repo's page with the account the token belongs to",
            )
        return kind.error("unauthorized", f"{where} is gated on {hub} ({status}): {kind.token_hint}")
    if isinstance(err, RevisionNotFoundError):
        return kind.error("not_found", f"{where}: revision not found on {hub}")
    rejected = f"the hub at {hub} rejected the token sent for {where} (401): {kind.token_fix}"
    if isinstance(err, RepositoryNotFoundError):
        if status == 401 and not token:  # the Hub answers 401 for private repos to anonymous callers
            return kind.error("unauthorized", f"{where} not found on {hub} (401); if it is private, {kind.token_hint}")
        if status == 401:
            return kind.error("unauthorized", rejected)
        if token:
            return kind.error(
                "not_found", f"{where} not found on {hub} ({status}), or the {name} given has no read access to it"
            )
        return kind.error(
            "not_found", f"{where} not found on {hub} ({status}); if it is private or gated, {kind.token_hint}"
        )
    if status == 401:
        return kind.error("unauthorized", rejected)
    if status == 403:
        return kind.error("forbidden", f"access to {where} is forbidden on {hub} (403): {kind.token_hint}")
    if status == 404:
        return kind.error("not_found", f"{where}: a file was not found on {hub} (404): {err}")
    return kind.error("unavailable", f"downloading {where} from {hub} failed ({status}): {err}")


# Model weights ------------------------------------------------------------------------------------

MODEL = RepoKind(
    label="",
    marker="config.json",
    invalid_id="is neither an existing local directory nor a valid hub model id",
    token_name="token",
    token_hint="set HUGGING_FACE_HUB_TOKEN to a token with read access to it",
    token_fix="set HUGGING_FACE_HUB_TOKEN to a valid token",
    error=WeightsDownloadError,
)


def download_weights(
    model_id: str,
    revision: str | None = None,
    token: str | None = None,
    *,
    settings: HubSettings | None = None,
) -> Path:
    """Return a local directory holding ``model_id``'s config, tokenizer and ``*.safetensors`` weights.

    ``model_id`` is an existing local directory (returned as is) or a hub repo id, downloaded into
    the cache (or found there when offline or the Hub is unreachable). ``token`` overrides the
    ``HUGGING_FACE_HUB_TOKEN`` / ``HF_TOKEN`` environment variables. With ``WEIGHTS_CACHE_OVERRIDE``
    set, the files are read from that directory instead (LoRAX's ``--weights-cache-override``). Raises
    ``WeightsDownloadError``.
    """
    override = os.environ.get("WEIGHTS_CACHE_OVERRIDE", "").strip()
    if override:  # the launcher's --weights-cache-override: the files are there, nothing is downloaded
        folder = Path(override).expanduser()
        if not folder.is_dir():
            raise WeightsDownloadError("not_found", f"WEIGHTS_CACHE_OVERRIDE={override} is not an existing directory")
        _ensure_safetensors(folder, f"WEIGHTS_CACHE_OVERRIDE directory {folder} (for {model_id})")
        return folder
    settings = settings or HubSettings.from_env()
    if token:
        settings = replace(settings, token=token)

    local = Path(model_id).expanduser()
    if local.is_dir():
        _ensure_safetensors(local, f"local directory {local}")
        return local
    if model_id.startswith(("/", "./", "../", "~")) or local.exists():
        raise WeightsDownloadError("not_found", f"{model_id} is not an existing local directory")

    where = MODEL.where(model_id, revision)

    def select(repo_files: list[str]) -> list[str]:
        files = select_files(repo_files)
        if not any(name.endswith((".safetensors", ".bin")) for name in files):
            raise WeightsDownloadError(
                "invalid",
                f"{where} has no weights on {settings.endpoint}: expected *.safetensors or pytorch_model*.bin "
                "files at the top level of the repo",
            )
        return files

    folder = fetch_snapshot(MODEL, model_id, revision, settings, settings.token, select).folder
    _ensure_safetensors(folder, where)
    return folder


def select_files(repo_files: list[str]) -> list[str]:
    """The files of a repo to download: support files, then the safetensors weights, else the ``.bin`` ones.

    Only top-level files count, and the files of sentence-transformers' module directories
    (``1_Pooling``, ``2_Dense_256``, ...) when the repo has a ``modules.json``. Among safetensors files
    the ``model*.safetensors`` ones are preferred, so copies of the weights in other layouts
    (``consolidated.safetensors``) are skipped; ``.bin`` weights are fetched only when the repo has no
    safetensors at all.
    """
    top = [name for name in repo_files if "/" not in name]
    wanted = [name for name in top if any(fnmatch.fnmatchcase(name, p) for p in SUPPORT_FILES)]
    safetensors = [name for name in top if name.endswith(".safetensors")]
    preferred = [name for name in safetensors if name.startswith("model")]
    if safetensors:
        wanted += preferred or safetensors
        wanted += [name for name in top if name == SAFETENSORS_INDEX]
    else:
        wanted += [n for n in top if n == BIN_INDEX or fnmatch.fnmatchcase(n, "pytorch_model*.bin")]
    if "modules.json" in top:
        wanted += _module_files(repo_files)
    return sorted(set(wanted))


def _module_files(repo_files: list[str]) -> list[str]:
    """The config and weights of each sentence-transformers module directory (safetensors over ``.bin``)."""
    files = [name for name in repo_files if _MODULE_FILE.match(name)]
    with_safetensors = {name.split("/")[0] for name in files if name.endswith(".safetensors")}
    return [n for n in files if not (n.endswith(".bin") and n.split("/")[0] in with_safetensors)]


def _ensure_safetensors(folder: Path, where: str) -> None:
    """Check ``folder`` holds complete safetensors weights, converting ``.bin`` weights once if needed."""
    try:
        bins = bin_weight_files(folder)
    except ConversionError as err:
        raise WeightsDownloadError("invalid", f"{where}: {err}") from err
    # Safetensors files that are not the conversion's targets mean the repo ships its own weights.
    own = {path.name for path in folder.glob("*.safetensors")} - {safetensors_name(p.name) for p in bins}
    if bins and not own and conversion_pending(folder):
        if not _is_writable(folder):
            raise WeightsDownloadError(
                "invalid",
                f"{where} holds only .bin weights and {folder} is not writable, so they cannot be "
                "converted to .safetensors: copy the model to a writable directory",
            )
        logger.info("converting %d .bin file(s) of %s to safetensors", len(bins), where)
        try:
            convert_bin_to_safetensors(folder)
        except (ConversionError, OSError) as err:
            raise WeightsDownloadError("invalid", f"cannot convert the .bin weights of {where}: {err}") from err
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        _check_index(index, where)
    elif not any(folder.glob("*.safetensors")):
        raise WeightsDownloadError(
            "invalid", f"{where} has no weights: no *.safetensors or pytorch_model*.bin files in {folder}"
        )


def _check_index(index: Path, where: str) -> None:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsDownloadError("invalid", f"{where}: cannot read {index.name}: {err}") from err
    missing = sorted(name for name in shards if not (index.parent / name).is_file())
    if missing:
        raise WeightsDownloadError("invalid", f"{where} is incomplete: {index.name} names missing files {missing}")


def _is_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)
