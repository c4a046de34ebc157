"""Read a checkpoint's tensors from `*.safetensors` files, whole or as this rank's tensor-parallel slice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..layers.parallel import Range, TensorParallel


class WeightsError(RuntimeError):
    """A checkpoint lacks a tensor or has one of the wrong shape; the message names it."""


class Weights:
    """Name → tensor access over every safetensors file of a model directory.

    `rank`/`world_size` describe tensor parallelism (`tp`): `get_ranges` reads this rank's slice.
    `optional_prefix`: a name that starts with it is also found without it (GPT-2 and Bloom checkpoints
    saved from the bare base model store `h.0...` for `transformer.h.0...`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        optional_prefix: str = "",
        quantizer: Callable[[torch.Tensor], Any] | None = None,
        checkpoint_format: Any = None,
    ) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise WeightsError(f"no *.safetensors files in {model_dir}")
        self.dtype, self.device = dtype, device
        # How `Linear.load` stores dense linear weights (`layers.quant.quantizer`); None: as they are.
        self.quantizer = quantizer
        # A pre-quantized checkpoint's reader (`layers.quant.checkpoint`): `load(weights, prefix, shape)`
        # returns a module's quantized weight, or None where the module is stored dense.
        self.checkpoint_format = checkpoint_format
        self.rank, self.world_size = rank, world_size
        self.tp = TensorParallel(rank, world_size, device)
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where: dict[str, int] = {}
        for i, handle in enumerate(self._handles):
            for name in handle.keys():
                self._where.setdefault(name, i)
        self._stored: dict[str, str] = {}  # requested name → stored name, where the checkpoint omits `optional_prefix`
        if optional_prefix:
            self._stored = {optional_prefix + n: n for n in self._where if not n.startswith(optional_prefix)}

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where or name in self._stored

    def _slice(self, name: str):  # noqa: ANN202 - safetensors' PySafeSlice has no public type
        stored = name if name in self._where else self._stored.get(name, name)
        if stored not in self._where:
            raise WeightsError(f"checkpoint is missing tensor {name!r}")
        return self._handles[self._where[stored]].get_slice(stored)

    def dtype_of(self, name: str) -> str:
        """The stored dtype as safetensors names it (e.g. "F32", "F8_E4M3", "I32")."""
        return self._slice(name).get_dtype()

    def _finish(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        # Integer tensors (quantized weights, indices) and float8 values keep their dtype.
        if tensor.is_floating_point() and tensor.element_size() > 1:
            tensor = tensor.to(self.dtype)
        tensor = tensor.to(self.device)
        if self.quantizer is not None or self.checkpoint_format is not None:
            # Tensors read as they are stay backed by the memory-mapped file, which keeps every page read
            # while loading resident (the quantized weights' dense originals included) for as long as
            # any of them lives: a quantized model owns its tensors and lets the file go.
            tensor = tensor.clone()
        return tensor

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def get(self, name: str, expect_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor; `expect_shape` (full, unsharded shape) is checked with a clear error."""
        sl = self._slice(name)
        shape = list(sl.get_shape())
        self._check_shape(name, shape, expect_shape)
        return self._finish(sl[:] if shape else sl[()], name)

    def get_stored(self, name: str) -> torch.Tensor:
        """The whole tensor in its stored dtype (scales that must not be rounded to the model's dtype)."""
        sl = self._slice(name)
        return (sl[:] if sl.get_shape() else sl[()]).to(self.device)

    def get_ranges(
        self, name: str, dim: int, ranges: tuple[Range, ...], expect_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """The (start, size) `ranges` along `dim`, read one after the other and concatenated: a rank's
        slice of a sharded tensor (several ranges where the checkpoint fuses parts, e.g. q|k|v)."""
        sl = self._slice(name)
        shape = list(sl.get_shape())
        self._check_shape(name, shape, expect_shape)
        merged: list[tuple[int, int]] = []  # adjacent ranges read as one (one shard's experts, say)
        for start, size in ranges:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        if merged == [(0, shape[dim])]:
            return self._finish(sl[:], name)
        ranges = tuple(merged)
        pieces = []
        for start, size in ranges:
            if start < 0 or start + size > shape[dim]:
                raise WeightsError(f"{name!r}: rows {start}..{start + size} outside dim {dim} of size {shape[dim]}")
            index = [slice(None)] * len(shape)
            index[dim] = slice(start, start + size)
            pieces.append(sl[tuple(index)])
        return self._finish(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim), name)

    @staticmethod
    def _check_shape(name: str, shape: list[int], expect: tuple[int, ...] | None) -> None:
        if expect is not None and tuple(shape) != tuple(expect):
            raise WeightsError(f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(expect)}")
