"""The CPU LoRA kernel (adapters/csrc/lora_sgmv.cpp) against the dense update scale·B·A in float64 and
against the torch plans: mixed ranks, parts an adapter skips, adapters absent from a linear, rows
without adapters, every block height (1 to 8 rows and their remainders), ranks and widths that are not
multiples of the vector width, strided rows, MoE experts' rows, 16-bit factors, the switch and bad
inputs."""

from __future__ import annotations

import pytest
import torch
from test_lora_groups import ADAPTERS, CASES, IN, adapted_linear, batch, dense_reference, factors, install

from lorax_server.adapters import lora_cpu
from lorax_server.adapters.lora import LoraModuleWeights, LoraSlots
from lorax_server.layers.linear import Linear
from lorax_server.layers.moe import ExpertRows

pytestmark = pytest.mark.skipif(lora_cpu.EXTENSION.ops() is None, reason="the CPU kernel did not build")
TOL = dict(rtol=1e-5, atol=1e-4)


def segments_of_sizes(sizes: list[int], adapters: list[int], gap: int = 0) -> tuple[int, list[tuple[int, int, int]]]:
    """Segments of `sizes` tokens for `adapters`, `gap` base-model rows before each; (tokens, segments)."""
    segments, start = [], 0
    for size, index in zip(sizes, adapters, strict=True):
        start += gap
        segments.append((start, start + size, index))
        start += size
    return start, segments


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_dense_update_and_the_plans(case: str, request: pytest.FixtureRequest):
    num_tokens, segments = CASES[case]
    linear = adapted_linear(ADAPTERS)
    x = torch.randn(num_tokens, IN, generator=torch.Generator().manual_seed(1))
    meta = batch(segments, num_tokens)
    assert lora_cpu.kernel_applies(torch.empty(1, 1), x)
    fast = linear(x, meta)
    torch.testing.assert_close(fast.double(), dense_reference(linear, x, segments), **TOL)
    request.getfixturevalue("lora_torch_plans")  # from here on, the torch plans
    torch.testing.assert_close(fast, linear(x, batch(segments, num_tokens)), **TOL)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 19])
def test_every_block_height_and_remainder(rows: int):
    """Segments of `rows` tokens: blocks of 8, 4, 2 and 1 rows and what is left of them."""
    part_sizes = [40, 47, 16]  # 32 + 8 columns, 32 + 15, one chunk of 16
    ranks = {1: {0: 16, 1: 16, 2: 16}, 2: {0: 5, 2: 20}, 3: {1: 37}}  # ranks of 48, 25 (16 + 9), 37 (32 + 5)
    linear = adapted_linear(ranks, part_sizes)
    num_tokens, segments = segments_of_sizes([rows, rows, rows], [1, 2, 3], gap=1)
    x = torch.randn(num_tokens, IN, generator=torch.Generator().manual_seed(rows))
    out = linear(x, batch(segments, num_tokens))
    torch.testing.assert_close(out.double(), dense_reference(linear, x, segments), **TOL)


@pytest.mark.parametrize("ranks", [(16,), (32,), (16, 16, 16), (40, 40), (40, 40, 33)])
def test_every_column_chunk_of_the_shrink(ranks: tuple[int, ...]):
    """The shrink's passes over A: stacks of 16, 32, 48, 80 (48 + 32) and 113 (48 + 48 + 16 + 1) ranks,
    in decode-sized and prompt-sized blocks."""
    linear = adapted_linear({1: dict(enumerate(ranks)), 2: {0: 3}}, [24, 40, 16][: len(ranks)])
    num_tokens, segments = segments_of_sizes([1, 8, 11], [1, 2, 1])
    x = torch.randn(num_tokens, IN, generator=torch.Generator().manual_seed(sum(ranks)))
    out = linear(x, batch(segments, num_tokens))
    torch.testing.assert_close(out.double(), dense_reference(linear, x, segments), **TOL)


def test_wide_parts_of_a_run_and_a_long_prompt_segment():
    """Equal parts expanded as one run (q|k|v without GQA) over a prompt-sized segment."""
    linear = adapted_linear({1: {0: 8, 1: 8, 2: 8}, 2: {0: 8, 1: 8, 2: 8}}, [96, 96, 96])
    assert [run.b.shape[1] for run in linear.lora._kernel_stack((1, 2), grow=False).runs] == [3]
    num_tokens, segments = segments_of_sizes([70, 3], [2, 1])
    x = torch.randn(num_tokens, IN, generator=torch.Generator().manual_seed(4))
    out = linear(x, batch(segments, num_tokens))
    torch.testing.assert_close(out.double(), dense_reference(linear, x, segments), **TOL)


def test_strided_rows_and_untouched_columns():
    linear = adapted_linear(ADAPTERS)
    segments = [(0, 3, 1), (3, 5, 5)]
    x = torch.randn(5, IN + 7, generator=torch.Generator().manual_seed(5))[:, 3 : 3 + IN]  # rows IN + 7 apart
    wide = torch.randn(5, 30, generator=torch.Generator().manual_seed(6))
    y = wide[:, 5:25]  # the linear's 20 output columns, rows 30 apart
    before = wide.clone()
    y.copy_(x @ linear.weight.t())
    linear.lora.add_to(y, x, batch(segments, 5))
    torch.testing.assert_close(y.double(), dense_reference(linear, x, segments), **TOL)
    assert torch.equal(wide[:, :5], before[:, :5]) and torch.equal(wide[:, 25:], before[:, 25:])


def test_expert_rows_take_the_kernel(monkeypatch: pytest.MonkeyPatch):
    """A MoE expert's rows (segments, no ForwardBatch) go through the kernel too, stacking as they come."""
    calls = []
    sgmv = lora_cpu.sgmv_
    monkeypatch.setattr(lora_cpu, "sgmv_", lambda *args: calls.append(1) or sgmv(*args))
    linear = adapted_linear(ADAPTERS)
    segments = [(0, 2, 5), (2, 6, 1)]
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(7))
    out = linear(x, ExpertRows(segments))
    assert calls and linear.lora.kept_order is not None
    torch.testing.assert_close(out.double(), dense_reference(linear, x, segments), **TOL)


def test_other_dtypes_and_the_switch_take_the_torch_plans(monkeypatch: pytest.MonkeyPatch):
    x = torch.randn(4, IN)
    assert not lora_cpu.kernel_applies(torch.empty(4, 20, dtype=torch.bfloat16), x.bfloat16())
    assert not lora_cpu.kernel_applies(torch.empty(20, 4).t(), x)  # columns not contiguous
    weight = torch.randn(20, IN, dtype=torch.bfloat16)
    linear = Linear(weight, None, [12, 4, 4], ["q", "k", "v"], [12, 4, 4])
    linear.lora = LoraSlots(linear)
    linear.lora.install(1, {0: LoraModuleWeights(torch.randn(4, IN).bfloat16(), torch.randn(12, 4).bfloat16(), 0.5)})
    out = linear(x.bfloat16(), batch([(0, 2, 1)], 4))
    assert out.dtype == torch.bfloat16 and linear.lora.kept_order is None  # the loop, which keeps no stack

    monkeypatch.setenv("LORAX_CPU_KERNELS", "0")
    monkeypatch.setattr(lora_cpu.EXTENSION, "_attempted", False)
    monkeypatch.setattr(lora_cpu.EXTENSION, "_ops", None)
    assert not lora_cpu.kernel_applies(torch.empty(4, 20), x)
    linear = adapted_linear(ADAPTERS)
    segments = [(0, 2, 1), (2, 4, 2)]
    torch.testing.assert_close(linear(x, batch(segments, 4)).double(), dense_reference(linear, x, segments), **TOL)


def test_bad_inputs_are_refused():
    linear = adapted_linear(ADAPTERS)
    stacked = linear.lora._kernel_stack((1, 2), grow=False)
    runs = stacked.kernel_runs()
    x, y = torch.randn(4, IN), torch.zeros(4, 20)

    def call(starts: list[int], ends: list[int], slots: list[int], runs=runs, y=y) -> None:  # noqa: ANN001
        i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        lora_cpu.sgmv_(y, x, stacked.a, i32(starts), i32(ends), i32(slots), runs)

    call([0], [4], [1])  # well formed
    with pytest.raises(RuntimeError, match="outside the stack"):
        call([0], [4], [len(stacked.adapters)])
    with pytest.raises(RuntimeError, match="outside the tokens"):
        call([2], [5], [0])
    with pytest.raises(RuntimeError, match="exceeds y's columns"):
        call([0], [4], [0], y=torch.zeros(4, 12))
    with pytest.raises(RuntimeError, match="exceeds a's ranks"):
        call([0], [4], [0], runs=lora_cpu.KernelRuns.of([(0, stacked.a.shape[2], runs.b[0])]))
    with pytest.raises(RuntimeError, match="int32"):
        lora_cpu.sgmv_(y, x, stacked.a, torch.tensor([0]), torch.tensor([4]), torch.tensor([0]), runs)


def _tiled(m: torch.Tensor) -> torch.Tensor:
    """A [rank, width] matrix in the kernel's column tiles, flat: the tiles of 32 columns row-major, then
    the last columns."""
    full = m.shape[1] // 32 * 32
    return torch.cat([*(m[:, t : t + 32].reshape(-1) for t in range(0, full, 32)), m[:, full:].reshape(-1)])


def _slot_parts(rank: int, width: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, 6, generator=g).to(dtype), torch.randn(width, rank, generator=g).to(dtype)


@pytest.mark.parametrize("width", [16, 32, 40, 96, 101])
@pytest.mark.parametrize(
    "stack_dtype,part_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
     (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
)  # fmt: skip
def test_slot_writer_layout(width: int, stack_dtype: torch.dtype, part_dtype: torch.dtype):
    """`write_slot_` writes A transposed and B transposed in column tiles into its slot alone: a float32
    stack holds B times its scale, as torch rounds it; a 16-bit one B as it is and the scale apart. A part of a
    smaller rank fills the first rows and ranks of its place, and every other value of the slot is
    written zero, whatever it held (NaN here)."""
    slots, stack_rank, nan = 3, 5, float("nan")
    a = torch.full((slots, 6, 2 * stack_rank), nan, dtype=stack_dtype)
    b = torch.full((slots, 2, stack_rank, width), nan, dtype=stack_dtype)
    scale = torch.full((slots, 2 * stack_rank), nan) if stack_dtype != torch.float32 else None
    (a0, b0), (a1, b1) = _slot_parts(3, width, part_dtype, 1), _slot_parts(5, width, part_dtype, 2)
    parts = [(a0, b0, 0, 0, 1, 0.5), (a1, b1, stack_rank, 0, 0, 3.0)]
    lora_cpu.write_slot_(a, lora_cpu.KernelRuns.of([(0, 0, b)]), scale, 1, parts)
    for pa, pb, r0, _, position, s in parts:
        rank = pa.shape[0]
        assert torch.equal(a[1, :, r0 : r0 + rank], pa.to(stack_dtype).t())
        rows = pb.t().to(stack_dtype) * s if scale is None else pb.t().to(stack_dtype)
        whole = torch.cat([rows, torch.zeros(stack_rank - rank, width, dtype=stack_dtype)])
        assert torch.equal(b[1, position].reshape(-1), _tiled(whole))
        if scale is not None:
            assert torch.equal(scale[1, r0 : r0 + rank], torch.full((rank,), s))
    for t in (a, b, *([scale] if scale is not None else [])):
        assert t[[0, 2]].isnan().all() and not t[1].isnan().any()  # the other slots are untouched
    assert not a[1, :, 3:stack_rank].any()
    if scale is not None:
        assert not scale[1, 3:stack_rank].any()
    one_part = [(a0, b0, 0, 0, 0, 0.5)]  # written again with one part of the two: the other one zeros
    lora_cpu.write_slot_(a, lora_cpu.KernelRuns.of([(0, 0, b)]), scale, 1, one_part)
    assert not a[1, :, stack_rank:].any() and not b[1, 1].any()


def test_slot_writer_refuses_what_does_not_fit():
    a, b = torch.zeros(2, 6, 8), torch.zeros(2, 1, 8, 40)
    runs = lora_cpu.KernelRuns.of([(0, 0, b)])
    pa, pb = _slot_parts(4, 40, torch.float32, 3)

    def write(slot=1, part=(pa, pb, 0, 0, 0, 1.0), a=a, runs=runs):  # noqa: ANN001, ANN202
        lora_cpu.write_slot_(a, runs, None, slot, [part])

    write()  # well formed
    with pytest.raises(RuntimeError, match="outside the stack"):
        write(slot=2)
    with pytest.raises(RuntimeError, match="no such run"):
        write(part=(pa, pb, 0, 1, 0, 1.0))
    with pytest.raises(RuntimeError, match="no such position"):
        write(part=(pa, pb, 0, 0, 1, 1.0))
    with pytest.raises(RuntimeError, match="exceed the stack's"):
        write(part=(pa, pb, 6, 0, 0, 1.0))
    with pytest.raises(RuntimeError, match="fit the stack"):
        write(part=(pa, pb[:32].contiguous(), 0, 0, 0, 1.0))
    with pytest.raises(RuntimeError, match="16-bit into a float32 stack"):
        write(a=a.bfloat16(), runs=lora_cpu.KernelRuns.of([(0, 0, b.bfloat16())]))
    with pytest.raises(RuntimeError, match="contiguous"):
        write(part=(pa.t().contiguous().t(), pb, 0, 0, 0, 1.0))


def test_kernel_and_grid_never_share_a_stack(request: pytest.FixtureRequest):
    """The kernel keeps a tiled stack; the torch grid (which reads B row-major) rebuilds its own, and the
    kernel its own again after it."""
    linear = adapted_linear(ADAPTERS)
    segments = [(0, 2, 1), (2, 4, 2)]
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(9))
    reference = dense_reference(linear, x, segments)
    torch.testing.assert_close(linear(x, batch(segments, 4)).double(), reference, **TOL)
    assert linear.lora._stacked.tiled
    grid = linear.lora._stack((1, 2))
    assert grid is not None and not grid.tiled
    torch.testing.assert_close(linear(x, batch(segments, 4)).double(), reference, **TOL)
    assert linear.lora._stacked.tiled


def check(linear: Linear, segments: list[tuple[int, int, int]], seed: int) -> None:
    """The linear on `segments` (one ForwardBatch, as a step makes) against the dense update."""
    tokens = max(end for _, end, _ in segments)
    x = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(linear(x, batch(segments, tokens)).double(), dense_reference(linear, x, segments), **TOL)


def test_an_adapter_joining_the_batch_takes_a_spare_slot():
    """A new adapter's prompt, then the decode step with it, write only its factors into the kept stack."""
    linear = adapted_linear({i: {0: 4, 1: 4, 2: 4} for i in range(1, 9)})
    check(linear, [(0, 2, 1), (2, 3, 2)], seed=1)  # the running batch: adapters 1 and 2
    kept = linear.lora._stacked
    assert kept.adapters == (1, 2, 0, 0, 0, 0)  # four spare slots
    slot_of_2 = kept.a[1].clone()
    serial = kept.serial
    check(linear, [(0, 3, 3)], seed=2)  # adapter 3's prompt step
    assert linear.lora._stacked is kept and kept.adapters == (1, 2, 3, 0, 0, 0) and kept.serial != serial
    assert torch.equal(kept.a[1], slot_of_2)
    check(linear, [(0, 2, 1), (2, 3, 2), (3, 4, 3)], seed=3)  # the decode step with it
    assert linear.lora._stacked is kept


def test_slots_are_written_whole_whatever_they_held():
    """A tiled stack's spare slots are left as allocated and an evicted adapter's slot is not cleared
    first: the slot writer writes every value of a slot. NaN put in the spare slots stays out of the
    outputs, and so do the factors of an adapter whose slot a smaller one (fewer parts) takes."""
    linear = adapted_linear({1: {0: 4, 1: 4, 2: 4}, 2: {0: 4, 1: 4, 2: 4}, 3: {0: 2}, 4: {1: 3}})
    check(linear, [(0, 2, 1), (2, 3, 2)], seed=1)  # the running batch: adapters 1 and 2
    kept = linear.lora._stacked
    spare = [slot for slot, index in enumerate(kept.adapters) if index == 0]
    for t in (kept.a, *(run.b for run in kept.runs)):
        t[spare] = float("nan")
    check(linear, [(0, 2, 3)], seed=2)  # adapter 3's prompt step: into a spare slot
    assert kept.adapters.index(3) in spare
    check(linear, [(0, 2, 4)], seed=3)  # adapter 4's: into the slot of adapter 1, which neither step used
    assert linear.lora._stacked is kept and kept.adapters[0] == 4
    check(linear, [(0, 2, 3), (2, 3, 4)], seed=4)


def test_spare_slots_run_out_and_the_running_adapters_stay():
    """With no spare slot left, a prompt step's new adapters restack together with the adapters the step
    before served (the running batch's), so the next decode step needs no restack."""
    linear = adapted_linear({i: {0: 4, 1: 4, 2: 4} for i in range(1, 12)})
    running = [(0, 1, 1), (1, 2, 2)]
    check(linear, running, seed=1)
    first = linear.lora._stacked
    for step, index in enumerate(range(3, 8)):  # five adapters join one by one: the fifth finds no slot
        check(linear, [(0, 2, index)], seed=10 + step)  # its prompt step
        kept = linear.lora._stacked
        assert (kept is first) == (index < 7)
        assert set(kept.adapters) - {0} == set(range(1, index + 1))
        running.append((len(running), len(running) + 1, index))
        check(linear, running, seed=20 + step)  # the decode step with it
        assert linear.lora._stacked is kept
    assert linear.lora._stacked.adapters.count(0) == 4


@pytest.mark.parametrize(
    ("joining", "restacks"),
    [({0: 8, 1: 4}, True), ({0: 4, 2: 4}, True), ({0: 2}, False)],
    ids=["a larger rank", "a part the stack lacks", "a smaller rank on fewer parts"],
)
def test_a_joining_adapter_restacks_only_when_it_does_not_fit_a_slot(joining: dict[int, int], restacks: bool):
    linear = adapted_linear({1: {0: 4, 1: 4}, 2: {0: 4, 1: 4}})
    check(linear, [(0, 2, 1), (2, 3, 2)], seed=1)
    kept = linear.lora._stacked
    install(linear, 3, joining, seed=3)
    check(linear, [(0, 2, 3)], seed=2)
    assert (linear.lora._stacked is not kept) == restacks
    check(linear, [(0, 2, 1), (2, 3, 2), (3, 5, 3)], seed=3)


def test_new_adapters_take_the_slots_of_ones_no_longer_running():
    """Adapters whose requests finished leave slots that new adapters (installed meanwhile, as cold loads
    do) take, beyond the spare ones; the running batch's slots stay as they are."""
    linear = adapted_linear({i: {0: 4, 1: 4, 2: 4} for i in range(1, 7)})
    running = [(0, 1, 1), (1, 2, 2)]
    check(linear, running, seed=1)
    kept = linear.lora._stacked
    for step, index in enumerate(range(3, 7)):  # four adapters join, each finishing after a step
        check(linear, [(0, 1, index)], seed=10 + step)
        check(linear, [*running, (2, 3, index)], seed=20 + step)
    check(linear, running, seed=2)
    assert linear.lora._stacked is kept and kept.adapters[:2] == (1, 2) and kept.adapters.count(0) < 3
    running_slots = kept.a[:2].clone()
    for index in (7, 8, 9):
        install(linear, index, {0: 4, 1: 4, 2: 4}, seed=index)
    joining = [(0, 2, 7), (2, 3, 8), (3, 5, 9)]
    check(linear, joining, seed=3)  # their prompt step: three slots, more than the spare ones left
    assert linear.lora._stacked is kept and kept.adapters[:2] == (1, 2) and {7, 8, 9} <= set(kept.adapters)
    assert torch.equal(kept.a[:2], running_slots)
    check(linear, [*running, *((s + 2, e + 2, i) for s, e, i in joining)], seed=4)
    assert linear.lora._stacked is kept


def install_16_bit(linear: Linear, index: int, parts: dict[int, int], dtype: torch.dtype) -> None:
    """Factors kept in 16 bits (as `kept_dtype` keeps adapters stored so), with `factors`' scales."""
    sizes = linear.part_sizes
    weights = {}
    for p, r in parts.items():
        w = factors(r, sizes[p], index * 10 + p)
        weights[p] = LoraModuleWeights(w.lora_a.to(dtype), w.lora_b.to(dtype), w.scale)
    linear.lora.install(index, weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_16_bit_factors_are_read_as_stored(dtype: torch.dtype, rows: int, request: pytest.FixtureRequest):
    """A stack of 16-bit adapters stays 16-bit, its scales apart (every chunk of the shrink, tiles and
    tails of the expand, every block height); the result is the dense update of the widened factors,
    as the torch plans compute it."""
    part_sizes = [40, 47, 16]
    linear = adapted_linear({}, part_sizes)
    install_16_bit(linear, 1, {0: 16, 1: 16, 2: 16}, dtype)
    install_16_bit(linear, 2, {0: 5, 2: 20}, dtype)
    install_16_bit(linear, 3, {1: 37}, dtype)
    num_tokens, segments = segments_of_sizes([rows, rows, rows], [1, 2, 3], gap=1)
    x = torch.randn(num_tokens, IN, generator=torch.Generator().manual_seed(rows))
    out = linear(x, batch(segments, num_tokens))
    kept = linear.lora._stacked
    assert kept.tiled and kept.a.dtype == dtype and {r.b.dtype for r in kept.runs} == {dtype}
    assert kept.scale is not None and kept.scale.dtype == torch.float32
    reference = dense_reference(linear, x, segments)
    torch.testing.assert_close(out.double(), reference, **TOL)
    request.getfixturevalue("lora_torch_plans")  # the grid and the loop, on float32 stacks
    torch.testing.assert_close(linear(x, batch(segments, num_tokens)).double(), reference, **TOL)
    torch.testing.assert_close(linear(x, ExpertRows(segments)).double(), reference, **TOL)


def test_adapters_of_other_dtypes_share_a_float32_stack():
    """Mixed dtypes stack in float32 with the scales folded; a joining adapter of another dtype than a
    16-bit stack's restacks (a slot would round it), one of the same dtype takes a spare slot."""
    linear = adapted_linear({1: {0: 4, 1: 4}})  # float32
    install_16_bit(linear, 2, {0: 4, 1: 4}, torch.bfloat16)
    check(linear, [(0, 2, 1), (2, 3, 2)], seed=1)
    assert linear.lora._stacked.a.dtype == torch.float32 and linear.lora._stacked.scale is None

    linear = adapted_linear({})
    install_16_bit(linear, 1, {0: 4, 1: 4}, torch.bfloat16)
    install_16_bit(linear, 2, {0: 4, 1: 4}, torch.bfloat16)
    check(linear, [(0, 2, 1), (2, 3, 2)], seed=2)
    kept = linear.lora._stacked
    assert kept.a.dtype == torch.bfloat16
    install_16_bit(linear, 3, {0: 4}, torch.bfloat16)
    check(linear, [(0, 2, 3)], seed=3)
    assert linear.lora._stacked is kept
    install_16_bit(linear, 4, {0: 4}, torch.float16)
    check(linear, [(0, 2, 4)], seed=4)
    assert linear.lora._stacked is not kept and linear.lora._stacked.a.dtype == torch.float32
    check(linear, [(0, 2, 1), (2, 3, 2), (3, 4, 3), (4, 6, 4)], seed=5)


def test_16_bit_bad_inputs_are_refused():
    linear = adapted_linear({})
    install_16_bit(linear, 1, {0: 4, 1: 4}, torch.bfloat16)
    stacked = linear.lora._kernel_stack((1,), grow=False, tiled=True)
    x, y = torch.randn(4, IN), torch.zeros(4, 20)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    segments = (i32([0]), i32([4]), i32([0]))
    lora_cpu.sgmv_(y, x, stacked.a, *segments, stacked.kernel_runs(), stacked.scale)  # well formed
    widened = lora_cpu.KernelRuns.of([(0, 0, stacked.runs[0].b.float())])
    with pytest.raises(RuntimeError, match="of a's dtype"):
        lora_cpu.sgmv_(y, x, stacked.a, *segments, widened, stacked.scale)
    with pytest.raises(RuntimeError, match="scale"):
        lora_cpu.sgmv_(y, x, stacked.a, *segments, stacked.kernel_runs(), stacked.scale[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        lora_cpu.sgmv_(y, x, stacked.a.double(), *segments, stacked.kernel_runs())
