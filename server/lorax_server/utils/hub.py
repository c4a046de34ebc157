"""Resolve a model id to a local directory of safetensors weights, downloading from the Hub when needed.

``download_weights`` is what ``lorax-server download-weights`` runs: a local directory passes through,
a hub repo id is fetched into the Hugging Face cache (only the files a server needs), and ``.bin``
checkpoints are converted once to ``.safetensors``. Hub settings (endpoint, token, offline mode,
cache directory) are read from the environment when the call is made, not when ``huggingface_hub``
is imported, so a launcher or a test can set them at any time.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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
TOKEN_HINT = "set HUGGING_FACE_HUB_TOKEN to a token with read access to it"

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
)


class WeightsDownloadError(Exception):
    """Weights could not be made available locally; the message says which model and why."""


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
    ``HUGGING_FACE_HUB_TOKEN`` / ``HF_TOKEN`` environment variables. Raises ``WeightsDownloadError``.
    """
    settings = settings or HubSettings.from_env()
    if token:
        settings = HubSettings(settings.endpoint, token, settings.offline, settings.cache_dir)

    local = Path(model_id).expanduser()
    if local.is_dir():
        _ensure_safetensors(local, f"local directory {local}")
        return local
    if model_id.startswith(("/", "./", "../", "~")) or local.exists():
        raise WeightsDownloadError(f"{model_id} is not an existing local directory")

    where = f"{model_id}" + (f" (revision {revision})" if revision else "")
    if settings.offline:
        folder = _cached_snapshot(model_id, revision, settings)
        if folder is None:
            raise WeightsDownloadError(
                f"{where} is not in the hub cache ({_cache_name(settings)}) and HF_HUB_OFFLINE is set: "
                "download it once with network access, or unset HF_HUB_OFFLINE"
            )
    else:
        folder = _download(model_id, revision, settings, where)
    _ensure_safetensors(folder, where)
    return folder


def select_files(repo_files: list[str]) -> list[str]:
    """The files of a repo to download: support files, then the safetensors weights, else the ``.bin`` ones.

    Only top-level files count. Among safetensors files the ``model*.safetensors`` ones are preferred,
    so copies of the weights in other layouts (``consolidated.safetensors``) are skipped; ``.bin``
    weights are fetched only when the repo has no safetensors at all.
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
    return sorted(set(wanted))


def _download(model_id: str, revision: str | None, settings: HubSettings, where: str) -> Path:
    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    try:
        # model_info: one request, no retries, so an unreachable hub falls back to the cache at once.
        info = api.model_info(model_id, revision=revision)
        if info.siblings is not None:
            repo_files = [sibling.rfilename for sibling in info.siblings]
        else:
            repo_files = api.list_repo_files(model_id, revision=info.sha or revision)
    except HFValidationError as err:
        raise WeightsDownloadError(
            f"{model_id} is neither an existing local directory nor a valid hub model id ({err})"
        ) from err
    except HfHubHTTPError as err:
        if _status(err) < 500:
            raise _http_error(err, where, settings) from err
        return _from_cache_after_failure(model_id, revision, settings, where, err)
    except Exception as err:  # connection refused, timeout, offline: the types depend on the HTTP backend
        return _from_cache_after_failure(model_id, revision, settings, where, err)

    files = select_files(repo_files)
    if not any(name.endswith((".safetensors", ".bin")) for name in files):
        raise WeightsDownloadError(
            f"{where} has no weights on {settings.endpoint}: expected *.safetensors or pytorch_model*.bin "
            "files at the top level of the repo"
        )
    try:
        folder = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=settings.cache_dir,
            token=settings.token,
            endpoint=settings.endpoint,
            allow_patterns=[glob.escape(name) for name in files],
        )
    except HfHubHTTPError as err:
        raise _http_error(err, where, settings) from err
    except Exception as err:  # connection lost mid-download, disk full, ...
        raise WeightsDownloadError(
            f"downloading {where} from {settings.endpoint} failed: {type(err).__name__}: {err}"
        ) from err
    return Path(folder)


def _from_cache_after_failure(
    model_id: str, revision: str | None, settings: HubSettings, where: str, err: Exception
) -> Path:
    folder = _cached_snapshot(model_id, revision, settings)
    if folder is None:
        raise WeightsDownloadError(
            f"cannot reach the hub at {settings.endpoint} ({type(err).__name__}: {err}) and {where} "
            f"is not in the hub cache ({_cache_name(settings)})"
        ) from err
    logger.warning("hub at %s unreachable (%s); using the cached %s", settings.endpoint, err, folder)
    return folder


def _cached_snapshot(model_id: str, revision: str | None, settings: HubSettings) -> Path | None:
    try:
        config = try_to_load_from_cache(
            model_id, "config.json", cache_dir=settings.cache_dir, revision=revision
        )
    except HFValidationError as err:
        raise WeightsDownloadError(
            f"{model_id} is neither an existing local directory nor a valid hub model id ({err})"
        ) from err
    return Path(config).parent if isinstance(config, str) else None


def _status(err: HfHubHTTPError) -> int:
    response = getattr(err, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def _http_error(err: HfHubHTTPError, where: str, settings: HubSettings) -> WeightsDownloadError:
    status = _status(err)
    hub = settings.endpoint
    if isinstance(err, GatedRepoError):
        return WeightsDownloadError(
            f"{where} is gated on {hub} ({status}): accept its conditions on the model page, then "
            f"set HUGGING_FACE_HUB_TOKEN to a token of an account that has been granted access"
        )
    if isinstance(err, RevisionNotFoundError):
        return WeightsDownloadError(f"{where}: revision not found on {hub}")
    if isinstance(err, RepositoryNotFoundError):
        if settings.token:
            return WeightsDownloadError(
                f"{where} not found on {hub} ({status}), or the token given has no access to it"
            )
        return WeightsDownloadError(
            f"{where} not found on {hub} ({status}); if it is private or gated, {TOKEN_HINT}"
        )
    if status == 401:
        return WeightsDownloadError(
            f"the hub at {hub} rejected the token sent for {where} (401): set HUGGING_FACE_HUB_TOKEN "
            "to a valid token"
        )
    if status == 403:
        return WeightsDownloadError(f"access to {where} is forbidden on {hub} (403): {TOKEN_HINT}")
    if status == 404:
        return WeightsDownloadError(f"{where}: a file was not found on {hub} (404): {err}")
    return WeightsDownloadError(f"downloading {where} from {hub} failed ({status}): {err}")


def _ensure_safetensors(folder: Path, where: str) -> None:
    """Check ``folder`` holds complete safetensors weights, converting ``.bin`` weights once if needed."""
    try:
        bins = bin_weight_files(folder)
    except ConversionError as err:
        raise WeightsDownloadError(f"{where}: {err}") from err
    # Safetensors files that are not the conversion's targets mean the repo ships its own weights.
    own = {path.name for path in folder.glob("*.safetensors")} - {safetensors_name(p.name) for p in bins}
    if bins and not own and conversion_pending(folder):
        if not _is_writable(folder):
            raise WeightsDownloadError(
                f"{where} holds only .bin weights and {folder} is not writable, so they cannot be "
                "converted to .safetensors: copy the model to a writable directory"
            )
        logger.info("converting %d .bin file(s) of %s to safetensors", len(bins), where)
        try:
            convert_bin_to_safetensors(folder)
        except (ConversionError, OSError) as err:
            raise WeightsDownloadError(f"cannot convert the .bin weights of {where}: {err}") from err
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        _check_index(index, where)
    elif not any(folder.glob("*.safetensors")):
        raise WeightsDownloadError(
            f"{where} has no weights: no *.safetensors or pytorch_model*.bin files in {folder}"
        )


def _check_index(index: Path, where: str) -> None:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsDownloadError(f"{where}: cannot read {index.name}: {err}") from err
    missing = sorted(name for name in shards if not (index.parent / name).is_file())
    if missing:
        raise WeightsDownloadError(f"{where} is incomplete: {index.name} names missing files {missing}")


def _is_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _cache_name(settings: HubSettings) -> str:
    if settings.cache_dir:
        return settings.cache_dir
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
