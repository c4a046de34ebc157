"""The one resident representation of every quantized weight: small integer codes, a table that maps a
code to its value, and one scale (and optionally one offset) per group of input channels:

    W[n, k] = table[code[n, k]] * scales[n, k // group_size] + offsets[n, k // group_size]

Every method fits it: affine integer formats (GPTQ, AWQ, HQQ: table = 0..2^bits-1, offset = -zero·scale),
codebooks (bitsandbytes nf4/fp4: table = the 16 code values, scale = the block's absmax), int8
(table = -128..127) and fp8 (table = the 256 float8_e4m3fn values). One CPU kernel (`lut.py`) computes
`x @ W.T` from it without materialising W. Act-order checkpoints (GPTQ `desc_act`) keep their input
channels sorted by group (`perm`), so that groups are contiguous and the activations are permuted
instead of the weight. When groups do not divide the input size, the last group is partial: the codes
are padded to whole groups and the activations padded with zeros (only tiny models hit this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lut import lut_dequantize, lut_matmul, pack_codes

STORED_BITS = {2: 2, 3: 4, 4: 4, 8: 8}  # 3-bit codes are stored one per nibble (the kernel has no 3-bit path)


class GroupedWeight:
    def __init__(
        self,
        codes: torch.Tensor,  # uint8 [out, padded_in * bits / 8], packed by `lut.pack_codes`
        bits: int,  # stored bits per code: 2, 4 or 8
        table: torch.Tensor,  # float32 [2**bits]
        scales: torch.Tensor,  # float32 [out, groups]
        offsets: torch.Tensor | None,  # float32 [out, groups]
        group_size: int,
        in_features: int,
        perm: torch.Tensor | None = None,  # int64 [in]: the kernel's input channel j is x[:, perm[j]]
    ) -> None:
        self.codes, self.bits, self.table = codes, bits, table
        self.scales, self.offsets, self.group_size = scales, offsets, group_size
        self.in_features, self.out_features = in_features, codes.shape[0]
        self.perm = perm

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,  # integer [out, in], values in [0, 2**bits)
        bits: int,
        table: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor | None,
        group_size: int,
        perm: torch.Tensor | None = None,
    ) -> GroupedWeight:
        out_features, in_features = codes.shape
        groups = -(-in_features // group_size)
        if tuple(scales.shape) != (out_features, groups):
            raise ValueError(f"scales have shape {tuple(scales.shape)}, expected {(out_features, groups)}")
        stored = STORED_BITS[bits]
        padded = groups * group_size
        codes = F.pad(codes.to(torch.uint8), (0, padded - in_features))
        table = _shared(F.pad(table.float(), (0, 2**stored - table.numel())).contiguous())
        return cls(
            pack_codes(codes, stored),
            stored,
            table,
            scales.float().contiguous(),
            None if offsets is None else offsets.float().contiguous(),
            group_size,
            in_features,
            perm,
        )

    @property
    def padded_in(self) -> int:
        return self.scales.shape[1] * self.group_size

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        y = lut_matmul(x, self.codes, self.bits, self.table, self.scales, self.offsets, self.group_size)
        return y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        w = lut_dequantize(
            self.codes, self.bits, self.table, self.scales, self.offsets, self.group_size, self.padded_in
        )
        w = w[:, : self.in_features]
        if self.perm is None:
            return w
        unpermuted = torch.empty_like(w)
        unpermuted[:, self.perm] = w
        return unpermuted

    def nbytes(self) -> int:
        # The table is one tensor shared by every weight of a method (`_shared`), not per weight.
        tensors = [self.codes, self.scales, self.offsets, self.perm]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def fusable_with(self, other: GroupedWeight) -> bool:
        """Whether `other` can be stacked below this weight as one matrix (fused q|k|v, gate|up)."""
        same_perm = (self.perm is None and other.perm is None) or (
            self.perm is not None and other.perm is not None and torch.equal(self.perm, other.perm)
        )
        return (
            (self.bits, self.group_size, self.in_features) == (other.bits, other.group_size, other.in_features)
            and (self.offsets is None) == (other.offsets is None)
            and (self.table is other.table or torch.equal(self.table, other.table))  # fp8's table holds NaNs
            and same_perm
        )

    @classmethod
    def stack(cls, parts: list[GroupedWeight]) -> GroupedWeight:
        """Parts stacked along the output dimension; they must be `fusable_with` each other."""
        first = parts[0]
        offsets = None if first.offsets is None else torch.cat([p.offsets for p in parts])  # type: ignore[misc]
        return cls(
            torch.cat([p.codes for p in parts]),
            first.bits,
            first.table,
            torch.cat([p.scales for p in parts]),
            offsets,
            first.group_size,
            first.in_features,
            first.perm,
        )


_TABLES: dict[tuple[str, bytes], torch.Tensor] = {}


def _shared(table: torch.Tensor) -> torch.Tensor:
    """One tensor per distinct table and device, however many weights use it."""
    key = (str(table.device), table.cpu().numpy().tobytes())
    return _TABLES.setdefault(key, table)


class StackedWeight:
    """Quantized parts that cannot share one matrix (for example act-order parts with different channel
    orders): one matmul each, outputs concatenated."""

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.matmul(x) for p in self.parts], dim=-1)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)


def stack_parts(parts: list) -> GroupedWeight | StackedWeight:
    """One weight for parts quantized separately (each part a checkpoint module)."""
    if len(parts) == 1:
        return parts[0]
    grouped = all(isinstance(p, GroupedWeight) for p in parts)
    if grouped and all(parts[0].fusable_with(p) for p in parts[1:]):
        return GroupedWeight.stack(parts)
    return StackedWeight(parts)
