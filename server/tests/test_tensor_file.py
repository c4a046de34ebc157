"""The adapter reader's safetensors files (`adapters/tensor_file.py`): what it reads equals the
safetensors library's reading, and a truncated or forged file is an error, never a view past the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_server.adapters.tensor_file import TensorFileError, read_tensor_file, tensor_names


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.lora_A.weight": torch.randn(4, 24, generator=g),
        "a.lora_B.weight": torch.randn(24, 4, generator=g).to(torch.bfloat16),
        "odd.f16": torch.randn(3, generator=g).to(torch.float16),  # 6 bytes: what follows is misaligned
        "b.f32": torch.randn(5, 2, generator=g),
        "c.f64": torch.randn(2, 3, dtype=torch.float64, generator=g),
        "ids": torch.arange(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_what_safetensors_reads(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    expected, got = load_file(str(path)), read_tensor_file(path)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert got[name].is_contiguous(), name
        assert torch.equal(got[name], tensor), name
    assert sorted(tensor_names(path)) == sorted(expected)


def test_misaligned_tensors_are_read(tmp_path: Path) -> None:
    """Offsets that are not a multiple of the dtype's size (a file mixing dtypes, written by another
    tool) are read from their own copy."""
    f32 = torch.arange(4, dtype=torch.float32)
    data = b"\x01\x02\x03" + f32.numpy().tobytes()
    header = {"pad": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    header["x"] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [3, 19]}
    path = _raw_file(tmp_path / "m.safetensors", header, data)
    got = read_tensor_file(path)
    assert torch.equal(got["x"], f32.view(2, 2)) and got["pad"].tolist() == [1, 2, 3]


def test_the_tensors_outlive_the_file(tmp_path: Path) -> None:
    """The mapping is private and kept by the tensors: replacing the file (as a new download of the
    same adapter does) changes nothing read before."""
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    got = read_tensor_file(path)
    replacement = tmp_path / "new.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(replacement))
    replacement.replace(path)
    assert torch.equal(got["w"], torch.ones(64, 64))


BAD_FILES = {
    "empty file": (b"", "too short"),
    "header longer than the file": (struct.pack("<Q", 1000) + b"{}", "incomplete"),
    "header not json": (struct.pack("<Q", 4) + b"{not", "not JSON"),
    "header not an object": (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_broken_headers_are_errors(tmp_path: Path, name: str) -> None:
    content, message = BAD_FILES[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(TensorFileError, match=message):
        read_tensor_file(path)
    with pytest.raises(TensorFileError, match=message):
        tensor_names(path)


BAD_ENTRIES = {
    "past the end": ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, 8, "incomplete"),
    "bytes not the shape's": ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, 8, "8 bytes for shape"),
    "unknown dtype": ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, 8, "unsupported dtype"),
    "negative size": ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, 8, "malformed shape"),
    "offsets reversed": ({"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}, 8, "malformed shape"),
    "offsets missing": ({"dtype": "F32", "shape": [2]}, 8, "malformed entry"),
    "entry not an object": ([1, 2], 8, "malformed entry"),
    "shape not a list": ({"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}, 8, "malformed shape"),
    "shape of strings": ({"dtype": "F32", "shape": [2, "a"], "data_offsets": [0, 8]}, 8, "malformed shape"),
    "shape of floats": ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, 8, "malformed shape"),
    "two negative sizes": ({"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}, 8, "malformed shape"),
    "offsets of floats": ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, 8, "malformed shape"),
}


@pytest.mark.parametrize("name", sorted(BAD_ENTRIES))
def test_forged_entries_are_errors(tmp_path: Path, name: str) -> None:
    entry, data_bytes, message = BAD_ENTRIES[name]
    path = _raw_file(tmp_path / "bad.safetensors", {"x": entry}, bytes(data_bytes))
    with pytest.raises(TensorFileError, match=message):
        read_tensor_file(path)


def test_a_truncated_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(TensorFileError, match="incomplete"):
        read_tensor_file(path)
