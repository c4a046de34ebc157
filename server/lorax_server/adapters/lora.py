"""Segmented LoRA math (SGMV in plain torch) and the bookkeeping that ties adapters to base linears.

The batch's tokens are grouped by adapter; `segments` are `(start, end, adapter_index)` token ranges.
For every adapted linear the base matmul has already run once for all tokens; each segment then adds
`scale · B_a(A_a(x[start:end]))` for every part (q/k/v of a fused qkv, ...) its adapter targets.
All parts of one adapter share one shrink matmul (their A's are stacked). Rows whose adapter does not
touch a linear, and base-model rows, cost nothing.

Two plans compute this. When the batch's segments pad into a grid cheaply (`forward.LoraGroups`:
decode and speculative steps, where each row is a few tokens), every adapter is applied at once: one
batched shrink over the adapters' A's stacked in segment order, one batched expand per part. The
stacks are copies of the batch's adapters' factors, kept while they still hold every adapter of the
batch (a decoding batch keeps its adapters for many steps), so a steady decode step copies no
weights. Otherwise (prefill, one segment, MoE experts' rows) a loop over the segments runs two small
matmuls per segment and part.

With `set_kernels("triton")` (chosen with the Triton attention backend) both plans give way to the
kernels of `layers.triton.lora` over the same kept stacks: BGMV (a stack slot per token) on decode
steps, SGMV (a slot per segment) on prompts and MoE experts' rows; no grid padding, no copies of x.
Otherwise, on float32 CPU tensors, `lora_cpu`'s C++ kernel does every segment and part of a linear in
one call over the same stacks (1.5-2.6x less time than the grid on decode steps, 1.2x less than the
loop on prompts: bench/cpu_kernels.py). The plans stay its reference, and run where it does not apply
(`LORAX_CPU_KERNELS=0` among them).

Adapters stored in bfloat16 or float16 keep that precision on a float32 model (`kept_dtype`): half the
memory, and the CPU kernel's stacks hold them as they are when all of a stack's adapters share it, so a
decode step reads half the bytes (the kernel widens each factor exactly as it reads it). Every other
stack, and every other path, computes in the model's dtype on the factors widened (also exact).

Semantics (the oracle faster kernels are tested against):
    y[s:e, out_p] += scale_p * (x[s:e] @ A_p.T) @ B_p.T    for each segment and each adapted part p
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..forward import ForwardBatch, LoraGroups, LoraKernelRows
from ..layers.linear import Linear, LoraRows
from . import lora_cpu

KERNELS = ("torch", "triton", "reference")
_kernels = "torch"
_triton_lora = None  # layers.triton.lora, imported when its kernels are chosen


def set_kernels(name: str) -> None:
    """How every `LoraSlots.add_to` computes from now on: "torch" (the default: the batched plan or the
    segment loop, any device, and `lora_cpu`'s kernel where it applies), "triton" (`layers.triton.lora`'s
    kernels: CUDA tensors, or CPU ones under TRITON_INTERPRET=1) or "reference" (the plans alone, no
    kernel: `--disable-sgmv`). The kernels are imported here, so a missing triton fails at start-up
    rather than on the first adapted batch."""
    global _kernels, _triton_lora
    if name not in KERNELS:
        raise ValueError(f"unknown LoRA kernels {name!r}: expected one of {', '.join(KERNELS)}")
    if name == "triton" and _triton_lora is None:
        from ..layers.triton import lora as triton_lora

        _triton_lora = triton_lora
    _kernels = name


def kernels() -> str:
    """The kernels `set_kernels` chose."""
    return _kernels


_changes = 0  # installs, removals and restacks, on any linear


def changes() -> int:
    """A count of every change to any linear's installed adapters or kept stack: what was checked of
    the stacks need not be checked again while it stays the same (`decode_graphs`)."""
    return _changes


def _changed() -> None:
    global _changes
    _changes += 1


@dataclass
class LoraModuleWeights:
    """One adapted module of one adapter."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]
    scale: float  # alpha / rank (alpha / sqrt(rank) with rslora)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense update scale·B·A: [out_features, in_features] (for tests and merges)."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())


@dataclass
class _Expand:
    out_start: int
    out_end: int
    r_start: int
    r_end: int
    b: torch.Tensor  # [out_end - out_start, r_end - r_start]
    scale: float


@dataclass
class _AdapterFactors:
    expands: list[_Expand]
    parts: dict[int, LoraModuleWeights]

    @functools.cached_property
    def a(self) -> torch.Tensor:
        """[sum of ranks, in_features]: the A of every part this adapter updates, in part order. Only
        the segment loop reads it, so it is built there, not when the adapter is installed between two
        decode steps (a fresh copy of the A's, page faults included, was most of an install's time)."""
        a_list = [w.lora_a for _, w in sorted(self.parts.items())]
        return torch.cat(a_list) if len(a_list) > 1 else a_list[0]


@dataclass
class _StackedPart:
    out_start: int
    out_end: int
    r_start: int
    r_end: int
    b: torch.Tensor  # [segments, rank of this part, out_end - out_start], scale folded in (not tiled)


@dataclass
class _ExpandRun:
    """Stacked parts that follow each other in the output and in the ranks with the same rank and width
    (q|k|v without GQA, k|v with it, gate|up): the grid expands them with one batched matmul."""

    out_start: int
    r_start: int  # its parts' ranks follow each other from here in the stack's shrunk columns
    b: torch.Tensor  # [segments, parts, rank, width]; each part's `_StackedPart.b` is a view of it


_serials = itertools.count(1)
_HALF = (torch.bfloat16, torch.float16)


def kept_dtype(stored: torch.dtype, model: torch.dtype) -> torch.dtype:
    """The dtype an adapter's factors are kept in: as stored when that is a 16-bit float and the model
    computes in float32 (widening is exact, so this loses nothing and halves their memory), otherwise
    the model's."""
    return stored if model == torch.float32 and stored in _HALF else model


@dataclass
class _Stacked:
    """A batch's adapters stacked in segment order (absent parts and smaller ranks are zeros).

    A `tiled` stack is the CPU kernel's: each part's [rank, width] in B laid out in column tiles (see
    `lora_cpu.write_slot_`), which only that kernel reads. Its factors are 16-bit when all of its
    adapters' are (of one dtype), and then `scale` holds the scales, which 16-bit B's cannot hold
    exactly. The kernels' stacks (the CPU kernel's and the Triton kernels') keep spare slots (adapter
    index 0; zeros, or a tiled stack's memory as allocated: no segment ever points at a spare slot): an
    adapter joining the batch is written into one, or into the slot of an adapter no longer used
    (`LoraSlots._kernel_stack`)."""

    adapters: tuple[int, ...]  # the adapter of each slot; 0: a spare slot
    a: torch.Tensor  # [segments, in_features, sum of the parts' ranks]
    parts: list[_StackedPart]
    runs: list[_ExpandRun]
    places: dict[int, tuple[int, int, int, int]]  # part → (its first rank in a, its rank, its run, its place there)
    tiled: bool = False
    scale: torch.Tensor | None = None  # [segments, sum of ranks] float32: the scales, when not folded into b
    serial: int = field(default_factory=_serials.__next__)  # tells stacks apart (decode graphs)
    _kernel_runs: lora_cpu.KernelRuns | None = field(default=None, init=False, repr=False)

    def kernel_runs(self) -> lora_cpu.KernelRuns:
        """The runs as the CPU kernel takes them, built once per stack (a decode step calls it per linear)."""
        if self._kernel_runs is None:
            self._kernel_runs = lora_cpu.KernelRuns.of([(run.out_start, run.r_start, run.b) for run in self.runs])
        return self._kernel_runs


class LoraSlots:
    """The adapters currently installed on one (possibly fused) linear, by adapter index: the
    `layers.linear.LinearHook` that LoRA attaches."""

    def __init__(self, linear: Linear, dtype: torch.dtype | None = None) -> None:
        """`dtype`: the one the linear computes in (default: its dense weight's, else float32)."""
        if dtype is None:
            dtype = linear.weight.dtype if isinstance(linear.weight, torch.Tensor) else torch.float32
        self.dtype = dtype
        bounds = [0]
        for size in linear.part_sizes:
            bounds.append(bounds[-1] + size)
        self.part_bounds = list(zip(bounds[:-1], bounds[1:], strict=True))
        self.by_adapter: dict[int, _AdapterFactors] = {}
        self._stacked: _Stacked | None = None
        # The adapter order the kept stack last served, checked: decode steps repeat it while the batch's
        # adapters stay the same, and skip the check. Forgotten when the stack or the installed adapters
        # change. The order of the step before, which its free slots must not take (`_kernel_stack`).
        self._checked_order: tuple[int, ...] | None = None
        self._last_order: tuple[int, ...] = ()

    def install(self, index: int, parts: dict[int, LoraModuleWeights]) -> None:
        """parts: fused-part position → that part's factors (parts the adapter skips are absent)."""
        expands, r = [], 0
        for part, w in sorted(parts.items()):
            out_start, out_end = self.part_bounds[part]
            expands.append(_Expand(out_start, out_end, r, r + w.rank, w.lora_b, w.scale))
            r += w.rank
        self.by_adapter[index] = _AdapterFactors(expands, parts)
        self._checked_order = None  # an order the kept stack served may now name an adapter it lacks
        self._forget_stack_of(index)
        _changed()

    def remove(self, index: int) -> None:
        self.by_adapter.pop(index, None)
        self._checked_order = None
        self._forget_stack_of(index)
        _changed()

    def _forget_stack_of(self, index: int) -> None:
        """Drop the kept stack if it holds a copy of `index`'s factors. Loading another adapter keeps
        it: the running batch goes on without restacking its adapters' weights."""
        if self._stacked is not None and index in self._stacked.adapters:
            self._stacked = None
            self._checked_order = None

    def adapter_indices(self) -> Collection[int]:
        return self.by_adapter.keys()

    @property
    def kept_order(self) -> tuple[int, ...] | None:
        """The adapters of the kept stack, in slot order (None: no stack kept)."""
        return self._stacked.adapters if self._stacked is not None else None

    def keep_stack_for(self, adapters: tuple[int, ...]) -> int:
        """Bring the kept stack up to date for a decode step over `adapters` (in the batch's order), as
        the kernels of that step would; returns the kept stack's serial (0: none). A captured decode
        graph reads the stack it was captured with (`decode_graphs`): a new serial makes it stale."""
        if adapters:
            self._kernel_stack(adapters, grow=False)
        return self._stacked.serial if self._stacked is not None else 0

    def add_to(self, y: torch.Tensor, x: torch.Tensor, rows: LoraRows) -> None:
        """y: [num_tokens, out_features] base output, updated in place; x: [num_tokens, in_features]."""
        if _kernels == "triton":
            self._add_with_kernels(y, x, rows)
            return
        if _kernels == "torch" and lora_cpu.kernel_applies(y, x):
            self._add_on_cpu(y, x, rows)
            return
        groups = rows.lora_groups() if isinstance(rows, ForwardBatch) else None
        if groups is not None:
            stacked = self._stack(groups.adapters)
            if stacked is not None:
                if stacked.adapters != groups.adapters:
                    groups = rows.lora_groups(stacked.adapters)
                self._add_grouped(y, x, groups, stacked)
            return
        for start, end, index in rows.lora_segments:
            factors = self.by_adapter.get(index)
            if factors is None:
                continue
            shrunk = x[start:end] @ factors.a.t().to(x.dtype)  # [n, sum of ranks]
            out = y[start:end]
            for e in factors.expands:
                b = e.b.t().to(x.dtype)
                out[:, e.out_start : e.out_end].addmm_(shrunk[:, e.r_start : e.r_end], b, alpha=e.scale)

    def _add_grouped(self, y: torch.Tensor, x: torch.Tensor, groups: LoraGroups, stacked: _Stacked) -> None:
        segments = len(groups.adapters)
        if groups.gather is None:  # the grid is the span's rows as they are
            grid = x[groups.span[0] : groups.span[1]]
        else:
            grid = x.index_select(0, groups.gather)
        longest = groups.longest
        shrunk = torch.bmm(grid.view(segments, longest, -1), stacked.a)  # [segments, longest, ranks]
        exact = groups.inverse is None  # the grid's cells are the span's rows, in order
        for run in stacked.runs:
            n, rank, width = run.b.shape[1:]
            columns = y if n * width == y.shape[1] else y[:, run.out_start : run.out_start + n * width]
            own = shrunk[:, :, run.r_start : run.r_start + n * rank]  # [segments, longest, n * rank]
            if n == 1 and exact and columns is y:  # in place: y's rows are the grid's cells
                y[groups.span[0] : groups.span[1]].view(segments, longest, width).baddbmm_(
                    own, run.b.view(segments, rank, width)
                )
                continue
            # Every (adapter, part) pair is one matrix of the batched matmul: [segments * parts, longest, rank].
            pairs = own.view(segments, longest, n, rank).transpose(1, 2)
            delta = torch.bmm(pairs.reshape(segments * n, longest, rank), run.b.view(segments * n, rank, width))
            delta = delta.view(segments, n, longest, width).transpose(1, 2)  # [segments, longest, parts, width]
            if exact:
                columns[groups.span[0] : groups.span[1]].view(segments, longest, n, width).add_(delta)
                continue
            delta = delta.reshape(segments * longest, n * width).index_select(0, groups.inverse)
            if groups.span is not None:
                columns[groups.span[0] : groups.span[1]] += delta
            else:
                columns.index_add_(0, groups.tokens, delta)

    def _kernel_plan(self, y: torch.Tensor, rows: LoraRows, tiled: bool) -> tuple[_Stacked, LoraKernelRows] | None:
        """The kept stack the kernels read and the rows' segments in its slots; None when none of the
        rows' adapters adapts this linear."""
        batch = rows if isinstance(rows, ForwardBatch) else None
        if batch is not None:
            order = batch.lora_order()
        else:
            order = tuple(dict.fromkeys(index for _, _, index in rows.lora_segments))
        stacked = self._kernel_stack(order, grow=batch is None, tiled=tiled)
        if stacked is None:
            return None
        if batch is not None:  # built once per forward pass and stack order, shared by the linears
            return stacked, batch.lora_kernel_rows(stacked.adapters)
        # A MoE expert's rows: built per call, as the expert's segments themselves are.
        return stacked, LoraKernelRows.build(rows.lora_segments, y.shape[0], y.device, stacked.adapters)

    def _add_on_cpu(self, y: torch.Tensor, x: torch.Tensor, rows: LoraRows) -> None:
        """`lora_cpu`'s kernel over the kept stack: every segment, part and run in one call."""
        planned = self._kernel_plan(y, rows, tiled=True)
        if planned is not None:
            stacked, plan = planned
            runs = stacked.kernel_runs()
            lora_cpu.sgmv_(y, x, stacked.a, plan.seg_start, plan.seg_end, plan.seg_slot, runs, stacked.scale)

    def _add_with_kernels(self, y: torch.Tensor, x: torch.Tensor, rows: LoraRows) -> None:
        """The Triton kernels over the kept stack: one shrink for every part, one expand per part."""
        if isinstance(rows, ForwardBatch) and rows.pinned_stacks:  # a decode graph: its captured stack
            self._add_pinned(y, x, rows)
            return
        planned = self._kernel_plan(y, rows, tiled=False)
        if planned is None:
            return
        stacked, plan = planned
        k = _triton_lora
        if plan.row_slot is not None:  # short queries (decode, drafts): each token reads its own slot
            _bgmv(y, x, stacked, plan.row_slot)
            return
        segments = (plan.seg_start, plan.seg_end, plan.seg_slot)
        shrunk = k.sgmv_shrink(x, stacked.a, *segments, max_len=plan.longest)
        for part in stacked.parts:
            columns = shrunk[:, part.r_start : part.r_end]
            k.sgmv_expand(y, columns, part.b, *segments, out_offset=part.out_start, max_len=plan.longest)

    def _add_pinned(self, y: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> None:
        """BGMV over the kept stack whatever the batch's adapters, with per-token slots the batch holds
        for that stack's order (`decode_graphs` fills them before every replay; -1: no adapter here)."""
        if self._stacked is not None:
            _bgmv(y, x, self._stacked, batch.lora_kernel_rows(self._stacked.adapters).row_slot)

    def _stack(self, adapters: tuple[int, ...]) -> _Stacked | None:
        """Stacked factors holding at least `adapters`; None when none of them adapts this linear.

        The stack kept from earlier steps serves as long as it holds every adapter of the batch and
        not more than twice as many (its extra rows are computed as padding): requests finishing do
        not restack the others' weights, only new adapters and a much smaller batch do."""
        kept = self._stacked
        if (
            kept is not None
            and not kept.tiled
            and set(adapters) <= set(kept.adapters)
            and len(kept.adapters) <= 2 * len(adapters)
        ):
            return kept
        if not any(index in self.by_adapter for index in adapters):
            return None
        return self._build_stack(adapters)

    def _kernel_stack(self, adapters: tuple[int, ...], grow: bool, tiled: bool = False) -> _Stacked | None:
        """The stack the kernels read: kept while it holds every adapter of `adapters` that adapts this
        linear. Unlike the grid, the kernels never read a slot no token points at, and give the batch's
        adapters absent from this linear slot -1, so a larger stack costs no work and absent adapters
        need no zero slots. `grow` (a MoE expert's rows, whose adapters change with the routing at every
        step) restacks with the kept adapters too, so that adapters coming and going are not copied
        again each time; removing an adapter drops the stack, which bounds it by the installed ones.
        `tiled`: the CPU kernel's layout (a kept stack of the other layout is rebuilt). Adapters that join
        the batch go into free slots, copying only theirs: spare slots, or the slots of adapters that
        neither this step nor the one before used (on a prompt step, the one before is the running
        batch's decode step). When too few are free, the stack is rebuilt with the adapters of both
        steps, so that the next decode step finds every adapter it needs."""
        kept = self._stacked
        if kept is not None and adapters == self._checked_order and kept.tiled == tiled:
            return kept  # the order of the step before (a decode step's usual case), already checked
        present = tuple(index for index in adapters if index in self.by_adapter)
        if not present:
            return None
        if kept is not None and kept.tiled != tiled:
            kept = None
        held = set(kept.adapters) if kept is not None else set()
        missing = [index for index in present if index not in held]
        if kept is None or (missing and not self._fill_free_slots(kept, missing, present)):
            if kept is not None:
                carried = kept.adapters if grow else self._last_order
                present += tuple(i for i in carried if i in self.by_adapter and i not in present)
            kept = self._build_stack(present, tiled, spare=max(4, len(present) // 4))
        self._checked_order = self._last_order = adapters
        return kept

    def _fill_free_slots(self, kept: _Stacked, missing: list[int], present: tuple[int, ...]) -> bool:
        """Write the adapters `missing` into the kept stack's free slots (spare, or holding an adapter
        neither `present` nor the order served before has); False (nothing written) when there are too
        few, or one of them has a part the stack lacks or a larger rank than it holds."""
        used = set(present) | set(self._last_order)
        free = [slot for slot, index in enumerate(kept.adapters) if index == 0 or index not in used]
        if len(missing) > len(free):
            return False
        for index in missing:
            for part, w in self.by_adapter[index].parts.items():
                place = kept.places.get(part)
                if place is None or w.rank > place[1] or not self._holds_exactly(kept, w):
                    return False
        order = list(kept.adapters)
        for index, slot in zip(missing, free, strict=False):
            if order[slot] != 0 and not kept.tiled:  # another adapter's factors: zeros first, as a new slot has
                kept.a[slot].zero_()
                for run in kept.runs:
                    run.b[slot].zero_()
                if kept.scale is not None:
                    kept.scale[slot].zero_()
            self._write_slot(kept, slot, self.by_adapter[index])
            order[slot] = index
        kept.adapters = tuple(order)
        kept.serial = next(_serials)  # a decode graph captured over the stack's old order is stale
        self._checked_order = None
        _changed()
        return True

    def _holds_exactly(self, stacked: _Stacked, w: LoraModuleWeights) -> bool:
        """Whether `w` fits the stack's dtype without rounding: the stack computes in the linear's dtype,
        or holds 16-bit factors of `w`'s own dtype."""
        return stacked.a.dtype in (self.dtype, w.lora_a.dtype) and stacked.a.dtype in (self.dtype, w.lora_b.dtype)

    @staticmethod
    def _write_slot(stacked: _Stacked, slot: int, factors: _AdapterFactors) -> None:
        """Copy an adapter's factors into a slot: A transposed, B transposed and scaled (the scales apart
        when the stack has `scale`); factors are widened to the stack's dtype before the scale applies. A
        tiled stack's slot is written whole, whatever it held, by the kernel's own writer in one call
        (`lora_cpu.write_slot_`); any other stack's must be zeros before."""
        if stacked.tiled:
            parts = []
            for part, w in factors.parts.items():
                r0, _, run, position = stacked.places[part]
                parts.append((w.lora_a.contiguous(), w.lora_b.contiguous(), r0, run, position, w.scale))
            lora_cpu.write_slot_(stacked.a, stacked.kernel_runs(), stacked.scale, slot, parts)
            return
        for part, w in factors.parts.items():
            r0, _, run, position = stacked.places[part]
            stacked.a[slot, :, r0 : r0 + w.rank] = w.lora_a.t()
            b = stacked.runs[run].b[slot, position]
            if stacked.scale is None:
                b[: w.rank] = w.lora_b.t().to(b.dtype) * w.scale
            else:
                b[: w.rank] = w.lora_b.t()
                stacked.scale[slot, r0 : r0 + w.rank] = w.scale

    def _build_stack(self, adapters: tuple[int, ...], tiled: bool = False, spare: int = 0) -> _Stacked:
        """Copy the factors of `adapters` (at least one of which adapts this linear) into a new kept stack,
        with `spare` slots after theirs: zeros, or in a tiled stack left as allocated (never read before
        the slot writer writes them whole), so that building one costs no zero fill of its spares."""
        present = [self.by_adapter.get(index) for index in adapters]
        ranks = {}  # part → the largest rank any of the adapters gives it
        for factors in filter(None, present):
            for part, w in factors.parts.items():
                ranks[part] = max(ranks.get(part, 0), w.rank)
        offsets, total = {}, 0
        for part in sorted(ranks):
            offsets[part] = total
            total += ranks[part]
        sample = next(iter(next(filter(None, present)).parts.values())).lora_a  # [rank, in_features]
        dtype = self._stack_dtype(filter(None, present), tiled)
        slots = len(adapters) + spare
        new = sample.new_empty if tiled else sample.new_zeros
        a = new(slots, sample.shape[1], total, dtype=dtype)
        parts, runs, places = [], [], {}
        for r, run in enumerate(self._expand_runs(ranks)):
            out_start, rank = self.part_bounds[run[0]][0], ranks[run[0]]
            width = self.part_bounds[run[0]][1] - out_start
            b_run = new(slots, len(run), rank, width, dtype=dtype)
            runs.append(_ExpandRun(out_start, offsets[run[0]], b_run))
            for i, part in enumerate(run):
                r0 = offsets[part]
                places[part] = (r0, rank, r, i)
                parts.append(
                    _StackedPart(out_start + i * width, out_start + (i + 1) * width, r0, r0 + rank, b_run[:, i])
                )
        scale = new(slots, total, dtype=torch.float32) if dtype != self.dtype else None
        self._stacked = _Stacked(adapters + (0,) * spare, a, parts, runs, places, tiled, scale)
        for slot, factors in enumerate(present):
            if factors is not None or tiled:  # a tiled stack's slot is written whole: zeros when absent
                self._write_slot(self._stacked, slot, factors or _AdapterFactors([], {}))
        self._checked_order = None
        _changed()
        return self._stacked

    def _stack_dtype(self, present: Iterable[_AdapterFactors], tiled: bool) -> torch.dtype:
        """The CPU kernel's (tiled) stacks keep their adapters' 16-bit dtype when they all share one;
        every other stack is in the dtype the linear computes in."""
        if not tiled or self.dtype != torch.float32:
            return self.dtype
        dtypes = {w.lora_a.dtype for factors in present for w in factors.parts.values()}
        dtypes |= {w.lora_b.dtype for factors in present for w in factors.parts.values()}
        return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(_HALF) else self.dtype

    def _expand_runs(self, ranks: dict[int, int]) -> list[list[int]]:
        """The stacked parts (`ranks`: part → its rank in the stack, in stack order) split into runs of
        neighbours with the same rank and width; a part the stack skips ends a run."""
        runs: list[list[int]] = []
        for part in sorted(ranks):
            width = self.part_bounds[part][1] - self.part_bounds[part][0]
            last = runs[-1][-1] if runs else None
            if (
                last == part - 1
                and ranks[last] == ranks[part]
                and self.part_bounds[last][1] - self.part_bounds[last][0] == width
            ):
                runs[-1].append(part)
            else:
                runs.append([part])
        return runs


def _bgmv(y: torch.Tensor, x: torch.Tensor, stacked: _Stacked, row_slot: torch.Tensor) -> None:
    """y[t] += every part of the adapter in stack slot row_slot[t] applied to x[t] (nothing for -1)."""
    shrunk = _triton_lora.bgmv_shrink(x, stacked.a, row_slot)
    for part in stacked.parts:
        _triton_lora.bgmv_expand(y, shrunk[:, part.r_start : part.r_end], part.b, row_slot, part.out_start)


def attach_lora(targets: Mapping[str, tuple[Linear, int]], dtype: torch.dtype) -> dict[int, LoraSlots]:
    """Hook a `LoraSlots` onto every linear that `targets` (module name → (linear, fused part)) names,
    computing in `dtype` (the model's).

    Returns the hooks by `id(linear)`. A linear that already carries one keeps it, so a second manager
    over the same model shares the installed adapters instead of hiding them.
    """
    slots: dict[int, LoraSlots] = {}
    for linear, _part in targets.values():
        if id(linear) not in slots:
            hook = linear.lora if isinstance(linear.lora, LoraSlots) else LoraSlots(linear, dtype)
            linear.lora = slots[id(linear)] = hook
    return slots


def segments_of(adapter_per_row: list[int], tokens_per_row: list[int]) -> list[tuple[int, int, int]]:
    """Token ranges of consecutive rows sharing a non-zero adapter index (rows are grouped by adapter)."""
    segments: list[tuple[int, int, int]] = []
    start = 0
    for index, n in zip(adapter_per_row, tokens_per_row, strict=True):
        if index and segments and segments[-1][2] == index and segments[-1][1] == start:
            segments[-1] = (segments[-1][0], start + n, index)
        elif index:
            segments.append((start, start + n, index))
        start += n
    return segments
