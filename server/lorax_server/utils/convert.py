"""Convert PyTorch ``.bin`` checkpoints to ``.safetensors``, once, next to the originals.

Checkpoints come from untrusted places, so a ``.bin`` file is only ever read with
``torch.load(..., weights_only=True)``: a pickle that holds anything but tensors and plain containers
is refused rather than executed.

Naming follows the Hugging Face convention: ``pytorch_model.bin`` becomes ``model.safetensors``,
``pytorch_model-00001-of-00002.bin`` becomes ``model-00001-of-00002.safetensors``, and a sharded
checkpoint also gets a ``model.safetensors.index.json`` whose weight map points at the new files.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_PREFIX = "pytorch_model"


class ConversionError(Exception):
    """A ``.bin`` checkpoint could not be converted (unsafe pickle, not a state dict, I/O error)."""


def bin_weight_files(directory: Path) -> list[Path]:
    """The ``.bin`` weight files of ``directory``: the shards its index names, else ``pytorch_model*.bin``.

    Other ``.bin`` files (``training_args.bin``, optimizer states) are not weights and are ignored.
    """
    index = directory / BIN_INDEX
    if index.is_file():
        weight_map = _read_weight_map(index)
        return [directory / name for name in sorted(set(weight_map.values()))]
    return sorted(directory.glob(f"{_BIN_PREFIX}*.bin"))


def safetensors_name(bin_name: str) -> str:
    """``pytorch_model-00001-of-00002.bin`` → ``model-00001-of-00002.safetensors``."""
    stem = bin_name.removesuffix(".bin")
    if stem.startswith(_BIN_PREFIX):
        stem = "model" + stem[len(_BIN_PREFIX) :]
    return stem + ".safetensors"


def conversion_pending(directory: Path) -> bool:
    """Whether ``convert_bin_to_safetensors`` would write anything (a target or the index is missing)."""
    bins = bin_weight_files(directory)
    if any(not (directory / safetensors_name(path.name)).exists() for path in bins):
        return True
    sharded = len(bins) > 1 or (directory / BIN_INDEX).is_file()
    return sharded and not (directory / SAFETENSORS_INDEX).exists()


def convert_bin_to_safetensors(directory: Path) -> list[Path]:
    """Write a ``.safetensors`` file for every ``.bin`` weight file in ``directory``; return the new files.

    A target that already exists is left untouched (the conversion runs once), so a second call is
    cheap. Each file is written to a temporary name and renamed, so an interrupted conversion never
    leaves a truncated ``.safetensors`` behind. Raises ``ConversionError`` on an unsafe or malformed
    checkpoint, and ``FileNotFoundError`` when the directory holds no ``.bin`` weights.
    """
    bins = bin_weight_files(directory)
    if not bins:
        raise FileNotFoundError(f"no pytorch_model*.bin weight files in {directory}")
    missing = [path.name for path in bins if not path.is_file()]
    if missing:
        raise ConversionError(f"{directory / BIN_INDEX} names shards that are missing: {', '.join(missing)}")

    outputs: list[Path] = []
    weight_map: dict[str, str] = {}
    total_size = 0
    for bin_path in bins:
        target = directory / safetensors_name(bin_path.name)
        if target.exists():
            names, size = _safetensors_names_and_size(target)
        else:
            names, size = convert_file(bin_path, target)
        weight_map.update({name: target.name for name in names})
        total_size += size
        outputs.append(target)

    index = directory / SAFETENSORS_INDEX
    if (len(bins) > 1 or (directory / BIN_INDEX).is_file()) and not index.exists():
        metadata = {"total_size": total_size}
        _write_json_atomically(index, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})
    return outputs


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConversionError(f"cannot read the weight map of {index}: {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index} has a malformed weight_map")
    bad = [name for name in set(weight_map.values()) if Path(name).name != name or not name.endswith(".bin")]
    if bad:
        raise ConversionError(f"{index} points outside its directory or at non-.bin files: {bad}")
    return weight_map


def convert_file(bin_path: Path, target: Path) -> tuple[list[str], int]:
    """Convert one `.bin` (read with weights_only) to `target` atomically; returns its tensor names and bytes."""
    state_dict = _load_state_dict(bin_path)
    names, size = list(state_dict), sum(t.numel() * t.element_size() for t in state_dict.values())
    _save_atomically(_untie(state_dict), target)
    return names, size


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f"refusing to load {path.name}: it holds objects other than tensors, and .bin files are only "
            f"read with torch.load(weights_only=True) ({err})"
        ) from err
    except Exception as err:  # torch raises a variety of types for truncated or foreign files
        raise ConversionError(f"cannot read {path.name} as a PyTorch checkpoint: {err}") from err
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ConversionError(f"{path.name} is not a state dict (a mapping of names to tensors)")
    return loaded


def _untie(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every tensor its own contiguous storage: safetensors refuses tensors that share memory.

    Tied weights (``lm_head.weight`` is ``embed_tokens.weight``) and views into a common buffer are
    cloned, so every name of the checkpoint is kept with its values.
    """
    owners: dict[int, int] = {}
    for tensor in state_dict.values():
        ptr = tensor.untyped_storage().data_ptr()
        owners[ptr] = owners.get(ptr, 0) + 1
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        storage = tensor.untyped_storage()
        shared = owners[storage.data_ptr()] > 1
        partial = storage.nbytes() != tensor.numel() * tensor.element_size()
        out[name] = tensor.contiguous().clone() if shared or partial else tensor.contiguous()
    return out


def _safetensors_names_and_size(path: Path) -> tuple[list[str], int]:
    """Tensor names and data bytes of a safetensors file, read from its header only."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return list(header), sum(end - start for start, end in (v["data_offsets"] for v in header.values()))


def _save_atomically(state_dict: dict[str, torch.Tensor], target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file(state_dict, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json_atomically(target: Path, data: dict) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
