"""Merging several LoRA adapters into one per request (LoRAX's `merged_adapters` parameter).

The result equals what peft's `LoraModel.add_weighted_adapter(adapters, weights, name,
combination_type=..., density=..., majority_sign_method=...)` builds for the LoRA combination types
"linear", "ties", "dare_linear" and "dare_ties" (checked against peft 0.21 in `tests/test_merge.py`).
The merge works on the factors, not on dense deltas, so the merged adapter keeps the rank of its inputs
and runs through the same segmented LoRA math as any other adapter.

Semantics, per adapted module, over the adapters i that have the module, in request order:

    c_i  = weights[i] * scale_i                  # the request's weight times the adapter's alpha/r
    wa_i = sign(c_i) * sqrt(|c_i|)               # sign(0) counts as +1
    wb_i = sqrt(|c_i|)                           # the sign goes on the A side only
    A    = combine([A_i], [wa_i])                # [rank, in_features]
    B    = combine([B_i], [wb_i])                # [out_features, rank]
    merged delta = 1.0 * B @ A                   # merged scale is 1 (peft: r = lora_alpha = rank)

where `combine(tensors, w)` is, with density d:
    linear       sum_i w_i T_i
    ties         keep each T_i's top int(d * numel) entries by magnitude (others 0); elect a sign per
                 entry from the kept, unweighted T_i (sum of values for "total", sum of signs for
                 "frequency"; ties go to +); average the w_i T_i that carry the elected (non-zero) sign,
                 dividing by how many do (at least 1)
    dare_linear  T_i * Bernoulli(d) / d, then as linear
    dare_ties    T_i * Bernoulli(d) / d, then sign election and disjoint mean as ties
With d == 1 nothing is pruned or dropped (and no random numbers are drawn).

Note that "linear" is *not* `sum_i weights[i] * delta_i`: the cross terms B_i A_j stay, exactly as
in peft. DARE draws one mask per task tensor: first the A of every adapter having the module (in
request order), then their B's.

peft behaviour mirrored on purpose:
- A request naming a single adapter is always merged as "linear" (peft forces it; no pruning).
- All adapters must have the same rank (peft refuses "linear", "ties" and "dare_*" merges of
  different ranks; the adapter rank is its largest module rank, like peft's max over `rank_pattern`),
  and within a module the factors must have identical shapes.
- A module present in only some adapters is merged from those alone, with their own weights and no
  renormalisation; under ties a lone adapter's factors are still trimmed to `density`.
- The merged module set is the union of the adapters' modules.

Deliberate differences from peft:
- When the *first* adapter uses rslora, peft gives the merged adapter lora_alpha = r *and*
  use_rslora, so its scale is sqrt(r) instead of 1 and the merged delta is sqrt(r) times the above
  (the result then depends on the adapters' order). We always use scale 1; a caller wanting peft's
  number multiplies `scale` by sqrt(rank).
- peft's DARE masks come from torch's global RNG, consumed module by module in model order. Ours come
  from a `torch.Generator` seeded from (`MergeSpec.seed`, module name), so a merge request always gives
  the same result whatever the order the adapter's modules were loaded in, and touches no global
  state. `merge_module` with one generator shared across modules, called in peft's module order,
  reproduces peft's masks for the same seed.
- Arithmetic runs in float32 (at least) and the result is cast back to the inputs' dtype; peft works
  in the adapter's own dtype (identical for float32 adapters).
- peft merges different `layers_to_transform`/regex target settings through the first adapter's
  config; we work from the adapters' tensors only, so every module of every adapter is merged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch

from .lora import LoraModuleWeights

__all__ = [
    "MERGE_STRATEGIES",
    "SIGN_METHODS",
    "LoraModuleWeights",
    "MergeSpec",
    "merge_adapters",
    "merge_module",
]

MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: one weight per adapter, in request order. Hashable, so it can key a merge cache
    together with the tuple of adapter ids."""

    strategy: str  # "linear" | "ties" | "dare_linear" | "dare_ties"
    weights: tuple[float, ...]
    density: float = 1.0  # fraction kept by TIES trimming / DARE dropping, in (0, 1]
    majority_sign_method: str = "total"  # "total" | "frequency"
    seed: int = 0  # DARE's random mask seed

    def __post_init__(self) -> None:
        # A list from a parsed request would make the spec unhashable (and mutable).
        if not isinstance(self.weights, tuple):
            object.__setattr__(self, "weights", tuple(self.weights))

    def validate(self, num_adapters: int) -> None:
        """Raise ValueError naming the offending `merged_adapters` field."""
        if num_adapters < 1:
            raise ValueError("merged_adapters.ids must name at least one adapter")
        if self.strategy not in MERGE_STRATEGIES:
            raise ValueError(
                f"merged_adapters.merge_strategy must be one of {', '.join(MERGE_STRATEGIES)}; got {self.strategy!r}"
            )
        if len(self.weights) != num_adapters:
            raise ValueError(
                f"merged_adapters.weights has {len(self.weights)} value(s) for {num_adapters} adapter(s); "
                "give one weight per adapter id"
            )
        for i, w in enumerate(self.weights):
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise ValueError(f"merged_adapters.weights[{i}] must be a finite number, got {w!r}")
        d = self.density
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0.0 < d <= 1.0:
            raise ValueError(f"merged_adapters.density must be in (0, 1], got {d!r}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ValueError(
                f"merged_adapters.majority_sign_method must be one of {', '.join(SIGN_METHODS)}; "
                f"got {self.majority_sign_method!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"merge seed must be an integer, got {self.seed!r}")


def merge_adapters(adapters: list[dict[str, LoraModuleWeights]], spec: MergeSpec) -> dict[str, LoraModuleWeights]:
    """Merge whole adapters (module name → factors), in request order, into one adapter of scale 1.

    Modules come out in order of first appearance. Raises ValueError on a bad spec, an empty
    adapter, different ranks, or factors of one module whose shapes differ."""
    spec.validate(len(adapters))
    ranks = []
    for i, adapter in enumerate(adapters):
        if not adapter:
            raise ValueError(f"merged_adapters.ids[{i}] has no LoRA modules to merge")
        ranks.append(max(m.rank for m in adapter.values()))
    if len(set(ranks)) > 1:
        raise ValueError(
            f"cannot merge adapters of different ranks {ranks}: linear, ties and dare merges need equal ranks"
        )
    if len(adapters) == 1:
        spec = dataclasses.replace(spec, strategy="linear")
    names = list(dict.fromkeys(name for adapter in adapters for name in adapter))
    merged: dict[str, LoraModuleWeights] = {}
    for name in names:
        present = [i for i, adapter in enumerate(adapters) if name in adapter]
        parts = [adapters[i][name] for i in present]
        sub = dataclasses.replace(spec, weights=tuple(spec.weights[i] for i in present))
        generator = None
        if sub.strategy.startswith("dare") and sub.density < 1.0:
            generator = torch.Generator(device=parts[0].lora_a.device)
            generator.manual_seed(_module_seed(spec.seed, name))
        try:
            merged[name] = merge_module(parts, sub, generator)
        except ValueError as e:
            raise ValueError(f"cannot merge module {name}: {e}") from e
    return merged


def merge_module(
    parts: list[LoraModuleWeights], spec: MergeSpec, generator: torch.Generator | None = None
) -> LoraModuleWeights:
    """Merge one module's factors from several adapters (`spec.weights` aligned with `parts`).

    DARE draws its masks from `generator` (one fresh generator seeded with `spec.seed` when None):
    the A of each part in order, then the B's. The result has scale 1.0 and the dtype of the inputs."""
    spec.validate(len(parts))
    a_shape, b_shape = parts[0].lora_a.shape, parts[0].lora_b.shape
    for i, p in enumerate(parts):
        if p.lora_a.dim() != 2 or p.lora_b.dim() != 2 or p.lora_a.shape[0] != p.lora_b.shape[1]:
            raise ValueError(
                f"adapter {i}: lora_A {tuple(p.lora_a.shape)} and lora_B {tuple(p.lora_b.shape)} are not LoRA factors"
            )
        if p.lora_a.shape != a_shape or p.lora_b.shape != b_shape:
            raise ValueError(
                f"factor shapes differ: lora_A {tuple(p.lora_a.shape)} vs {tuple(a_shape)}, "
                f"lora_B {tuple(p.lora_b.shape)} vs {tuple(b_shape)}"
            )
    if generator is None and spec.strategy.startswith("dare") and spec.density < 1.0:
        generator = torch.Generator(device=parts[0].lora_a.device)
        generator.manual_seed(spec.seed)
    wa, wb = _split_weights(parts, spec.weights)
    out_dtype = parts[0].lora_a.dtype
    a = _combine([p.lora_a for p in parts], wa, spec, generator)  # [rank, in_features]
    b = _combine([p.lora_b for p in parts], wb, spec, generator)  # [out_features, rank]
    return LoraModuleWeights(a.to(out_dtype), b.to(out_dtype), 1.0)


def _split_weights(parts: list[LoraModuleWeights], weights: tuple[float, ...]) -> tuple[list[float], list[float]]:
    """Fold each adapter's scale into its weight and share it between the A side (signed) and B side."""
    wa, wb = [], []
    for p, w in zip(parts, weights, strict=True):
        c = float(w) * float(p.scale)
        root = math.sqrt(abs(c))
        wa.append(root if c >= 0 else -root)
        wb.append(root)
    return wa, wb


def _combine(
    tensors: list[torch.Tensor], weights: list[float], spec: MergeSpec, generator: torch.Generator | None
) -> torch.Tensor:
    """One merge strategy over same-shaped task tensors; returns their merged tensor (float32 or wider)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    work = [t.to(dtype) for t in tensors]
    if spec.density < 1.0:
        if spec.strategy == "ties":
            work = [_keep_top_magnitude(t, spec.density) for t in work]
        elif spec.strategy.startswith("dare"):
            assert generator is not None
            work = [t * _random_keep_mask(t, spec.density, generator) / spec.density for t in work]
    stacked = torch.stack(work)  # [num_parts, *shape]
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))  # [num_parts, 1, ...]
    weighted = stacked * w  # [num_parts, *shape]
    if spec.strategy in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    return _disjoint_mean(stacked, weighted, spec.majority_sign_method)


def _keep_top_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming: zero all but the int(density * numel) largest-magnitude entries."""
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = 1
    return t * keep.view_as(t)


def _random_keep_mask(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: an i.i.d. Bernoulli(density) 0/1 mask shaped like `t`."""
    return torch.bernoulli(torch.full_like(t, density), generator=generator)


def _disjoint_mean(stacked: torch.Tensor, weighted: torch.Tensor, method: str) -> torch.Tensor:
    """TIES sign election on the unweighted `stacked` [num_parts, *shape], then the mean of the
    `weighted` entries agreeing with the elected sign."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)  # [*shape]
    elected = torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)
    agree = signs == elected  # [num_parts, *shape]
    count = agree.sum(dim=0).clamp(min=1)  # [*shape]
    return (weighted * agree).sum(dim=0) / count


def _module_seed(seed: int, module: str) -> int:
    """A stable 63-bit seed for one module's DARE masks (not Python's salted hash())."""
    digest = hashlib.blake2b(f"{seed}\0{module}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
