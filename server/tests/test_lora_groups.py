"""The batched LoRA plan (adapters stacked, segments padded into a grid) against the per-segment loop
and against the dense update scale·B·A: mixed ranks, adapters that skip parts or the whole linear,
rows without adapters, and the stacks' cache across installs and removals. The CPU kernel, which
would otherwise take these float32 CPU tensors, is off here (tests/test_lora_cpu_kernel.py)."""

from __future__ import annotations

import pytest
import torch

from lorax_server.adapters.lora import LoraModuleWeights, LoraSlots
from lorax_server.forward import ForwardBatch, LoraGroups
from lorax_server.layers.linear import Linear
from lorax_server.layers.moe import ExpertRows

PART_SIZES = [12, 4, 4]  # a fused q|k|v with fewer kv heads
IN = 16

pytestmark = pytest.mark.usefixtures("lora_torch_plans")


def factors(rank: int, out: int, seed: int) -> LoraModuleWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraModuleWeights(torch.randn(rank, IN, generator=g), torch.randn(out, rank, generator=g), 0.5 + seed / 10)


def adapted_linear(adapters: dict[int, dict[int, int]], part_sizes: list[int] = PART_SIZES) -> Linear:
    """adapters: index → {part: rank}."""
    weight = torch.randn(sum(part_sizes), IN, generator=torch.Generator().manual_seed(0))
    linear = Linear(weight, None, part_sizes, ["q", "k", "v"][: len(part_sizes)], part_sizes)
    linear.lora = LoraSlots(linear)
    for index, parts in adapters.items():
        install(linear, index, parts, seed=index)
    return linear


def install(linear: Linear, index: int, parts: dict[int, int], seed: int) -> None:
    sizes = linear.part_sizes
    weights = {p: factors(r, sizes[p], seed * 10 + p) for p, r in parts.items()}
    linear.lora.install(index, weights)


def dense_reference(linear: Linear, x: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
    y = x.double() @ linear.weight.double().t()
    bounds = linear.lora.part_bounds
    for start, end, index in segments:
        installed = linear.lora.by_adapter.get(index)
        for part, w in (installed.parts if installed else {}).items():
            lo, hi = bounds[part]
            y[start:end, lo:hi] += x[start:end].double() @ w.delta().double().t()
    return y


def batch(segments: list[tuple[int, int, int]], num_tokens: int) -> ForwardBatch:
    ids = torch.zeros(num_tokens, dtype=torch.int64)
    tables = torch.zeros(num_tokens, 1, dtype=torch.int64)
    return ForwardBatch.build(ids, [1] * num_tokens, [1] * num_tokens, tables, 4, lora_segments=segments)


ADAPTERS = {1: {0: 4, 1: 4, 2: 4}, 2: {0: 2, 2: 8}, 3: {1: 3}, 5: {0: 8, 1: 8, 2: 8}}
CASES = {
    "grouped by adapter, base rows first": (10, [(2, 4, 1), (4, 5, 2), (5, 8, 3), (8, 10, 5)]),
    "equal segments, no padding": (8, [(0, 2, 1), (2, 4, 2), (4, 6, 3), (6, 8, 5)]),
    "base rows between segments": (12, [(0, 3, 2), (4, 6, 1), (9, 12, 5)]),
    "an adapter absent from this linear": (9, [(0, 3, 1), (3, 5, 4), (5, 9, 2)]),
}


@pytest.mark.parametrize("case", CASES)
def test_grouped_plan_matches_the_loop_and_the_dense_update(case: str):
    num_tokens, segments = CASES[case]
    linear = adapted_linear(ADAPTERS)
    x = torch.randn(num_tokens, IN, generator=torch.Generator().manual_seed(1))
    meta = batch(segments, num_tokens)
    assert meta.lora_groups() is not None
    grouped = linear(x, meta)
    looped = linear(x, ExpertRows(segments))  # no grid: the per-segment loop
    reference = dense_reference(linear, x, segments)
    torch.testing.assert_close(grouped.double(), reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("part_sizes", [[20], [6, 6, 6]], ids=["one part", "three equal parts"])
def test_parts_expanded_together_match_the_dense_update(case: str, part_sizes: list[int]):
    """One part filling the output (expanded in place into an exact grid's rows) and equal parts that
    one batched matmul expands together (every stacked part in one run)."""
    num_tokens, segments = CASES[case]
    adapters = {index: {p: r for p, r in parts.items() if p < len(part_sizes)} for index, parts in ADAPTERS.items()}
    linear = adapted_linear({i: parts for i, parts in adapters.items() if parts}, part_sizes)
    x = torch.randn(num_tokens, IN, generator=torch.Generator().manual_seed(1))
    grouped = linear(x, batch(segments, num_tokens))
    sizes = [run.b.shape[1] for run in linear.lora._stacked.runs]
    assert sum(sizes) == len(part_sizes) and (len(part_sizes) == 1 or max(sizes) > 1)  # some share a run
    torch.testing.assert_close(grouped.double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4)


def test_no_adapter_of_the_batch_on_this_linear_leaves_the_base_output():
    linear = adapted_linear({1: {0: 4}})
    x = torch.randn(6, IN)
    meta = batch([(0, 3, 7), (3, 6, 8)], 6)
    assert torch.equal(linear(x, meta), linear(x, None))


def test_stacks_follow_installs_removals_and_order():
    linear = adapted_linear(ADAPTERS)
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(2))
    segments = [(0, 4, 1), (4, 8, 5)]
    before = linear(x, batch(segments, 8))
    kept = linear.lora._stacked
    install(linear, 9, {0: 2}, seed=9)  # another adapter loads: the batch's stack stays
    assert linear.lora._stacked is kept
    install(linear, 5, {0: 2}, seed=42)  # index 5 now holds other weights
    after = linear(x, batch(segments, 8))
    torch.testing.assert_close(after.double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(before, after)
    swapped = [(0, 4, 5), (4, 8, 1)]
    torch.testing.assert_close(
        linear(x, batch(swapped, 8)).double(), dense_reference(linear, x, swapped), rtol=1e-5, atol=1e-4
    )
    linear.lora.remove(5)
    torch.testing.assert_close(
        linear(x, batch(segments, 8)).double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4
    )


def test_a_kept_stack_serves_a_batch_of_fewer_adapters():
    """Requests finishing leave the stack as it is; its rows without tokens are padding."""
    linear = adapted_linear(ADAPTERS)
    x = torch.randn(10, IN, generator=torch.Generator().manual_seed(3))
    linear(x, batch([(0, 3, 1), (3, 5, 2), (5, 8, 3), (8, 10, 5)], 10))
    kept = linear.lora._stacked
    for segments in ([(0, 4, 2), (4, 10, 5)], [(0, 2, 5), (2, 3, 3), (5, 9, 1)]):
        out = linear(x, batch(segments, 10))
        assert linear.lora._stacked is kept
        torch.testing.assert_close(out.double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4)
    linear(x, batch([(0, 4, 2), (4, 10, 4)], 10))  # adapter 4 is new (and absent here): restacked
    assert linear.lora._stacked is not kept and linear.lora._stacked.adapters == (2, 4)


def test_grid_layouts():
    assert LoraGroups.build([(0, 5, 1)], torch.device("cpu")) is None  # one segment: the loop
    skewed = [(0, 20, 1), (20, 21, 2), (21, 22, 3)]
    assert LoraGroups.build(skewed, torch.device("cpu")) is None  # 60 cells for 22 tokens
    equal = LoraGroups.build([(1, 3, 1), (3, 5, 2)], torch.device("cpu"))
    assert equal.gather is None and equal.span == (1, 5) and equal.longest == 2
    ragged = LoraGroups.build([(0, 3, 1), (5, 6, 2)], torch.device("cpu"))
    assert ragged.adapters == (1, 2) and ragged.span is None
    assert ragged.gather.tolist() == [0, 1, 2, 5, 5, 5]
    assert ragged.inverse.tolist() == [0, 1, 2, 3] and ragged.tokens.tolist() == [0, 1, 2, 5]
    ordered = LoraGroups.build([(0, 2, 1), (2, 3, 2)], torch.device("cpu"), order=(2, 7, 1))
    assert ordered.adapters == (2, 7, 1) and ordered.span == (0, 3)
    assert ordered.gather.tolist() == [2, 2, 0, 0, 0, 1]  # adapter 7's row is all padding
    assert ordered.inverse.tolist() == [4, 5, 0]


def test_a_speculative_step_applies_its_adapters_grouped():
    """Rows of a few tokens each (a row's next token and its drafts) take the grouped plan, exactly."""
    linear = adapted_linear(ADAPTERS)
    query_lens, adapters = [5, 1, 3, 2], [1, 5, 2, 1]  # a row of adapter 1 on each side
    starts = [0, 5, 6, 9]
    segments = [(s, s + n, a) for s, n, a in zip(starts, query_lens, adapters, strict=True)]
    x = torch.randn(11, IN, generator=torch.Generator().manual_seed(3))
    meta = ForwardBatch.build(
        torch.zeros(11, dtype=torch.int64), query_lens, [9, 4, 7, 3], torch.zeros(4, 3, dtype=torch.int64), 4,
        lora_segments=segments,
    )  # fmt: skip
    assert meta.lora_groups() is not None
    torch.testing.assert_close(linear(x, meta).double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(linear(x, meta), linear(x, ExpertRows(segments)), rtol=1e-5, atol=1e-4)
