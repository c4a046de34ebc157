"""Read a safetensors file as views of one private mapping of it.

An adapter is read between two decode steps when it is small and local (`AdapterManager.is_quick`),
so its reading time is added to one inter-token gap of every running request. The safetensors library
maps the file too, but makes each tensor with a slice of the mapping in Python: about 9 µs a tensor,
1.0 ms for a rank-16 adapter of 112 tensors on the bench model. One view per tensor takes 0.3 ms.
Copying the file instead (0.2 ms) costs a fresh page's fault for each 4 KiB written: 0.6-2.2 ms.

The mapping is private, as the library's is: nothing is read until a tensor is used, and writes
(there are none: factors are copied into stacks) would not reach the file.

The format: an 8-byte little-endian header length, a JSON header (name → dtype, shape and
[begin, end) byte offsets into the data after it; "__metadata__" → strings), then the data. Every
entry is checked against the data's size, so a truncated or forged file is an error, never a view
past the mapping.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class TensorFileError(ValueError):
    """The file is not a valid safetensors file; the message says what is wrong."""


def tensor_names(path: Path) -> list[str]:
    """The names of the tensors in the safetensors file at `path`, its header checked (nothing mapped)."""
    with open(path, "rb") as f:
        return list(_read_header(f)[1])


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at `path`, views of one private mapping of it."""
    with open(path, "rb") as f:
        start, entries, size = _read_header(f)
    whole = torch.empty(0, dtype=torch.uint8)
    whole.set_(torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size))
    typed: dict[torch.dtype, torch.Tensor] = {}  # the mapping as each dtype, for views of aligned tensors
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        itemsize = dtype.itemsize
        if (start + begin) % itemsize:  # misaligned (a file mixing dtypes): its own copy
            tensors[name] = whole[start + begin : start + end].clone().view(dtype).view(shape)
            continue
        if dtype not in typed:
            typed[dtype] = whole[: size - size % itemsize].view(dtype)
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        tensors[name] = typed[dtype].as_strided(shape, strides, (start + begin) // itemsize)
    return tensors


def _read_header(f: BinaryIO) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]], int]:
    """(the data's first byte in the file, its entries by name, the file's size) of an open file."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise TensorFileError(f"{size} bytes: too short for a header")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise TensorFileError(f"a header of {header_len} bytes in a file of {size}: incomplete file")
    entries = _parse_header(f.read(header_len))
    start = 8 + header_len
    for name, (_, _, _, end) in entries.items():
        if start + end > size:
            raise TensorFileError(f"tensor {name!r} ends at byte {end} of {size - start}: incomplete file")
    return start, entries, size


def _parse_header(raw: bytes) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name → (dtype, shape, begin, end), each entry's bytes matching its shape."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise TensorFileError(f"the header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise TensorFileError("the header is not a JSON object")
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise TensorFileError(f"tensor {name!r}: a malformed entry ({e})") from e
        if dtype is None:
            raise TensorFileError(f"tensor {name!r}: unsupported dtype {entry['dtype']!r}")
        # Checked without a Python loop over the dimensions (a rank-16 adapter has 112 entries, read
        # between two decode steps): a product of JSON ints is an int, of anything else not, or an error.
        try:
            count = math.prod(shape) if type(shape) is list else None
            lowest = min(shape, default=0) if count is not None else 0
        except TypeError:
            count, lowest = None, 0
        if (
            type(count) is not int
            or lowest < 0
            or type(begin) is not int
            or type(end) is not int
            or not 0 <= begin <= end
        ):
            raise TensorFileError(f"tensor {name!r}: a malformed shape or offsets")
        if end - begin != count * dtype.itemsize:
            raise TensorFileError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
        entries[name] = (dtype, shape, begin, end)
    return entries
