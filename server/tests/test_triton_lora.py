"""The Triton multi-LoRA kernels (run by the Triton interpreter on the CPU) against their torch
references, and `LoraSlots` with the kernels switched on against the torch plans and the dense update
scale·B·A: ragged segments, rows without an adapter, mixed ranks (4 to 128), fused parts an adapter
skips, adapters absent from a linear, prefill and decode layouts, MoE experts' rows, and a tiny Llama
whose logits and greedy tokens do not change with the switch. The CPU kernel, which the torch plans
would otherwise give way to on these float32 CPU tensors, is off here: the plans are the reference."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton defines the kernels: run them on the CPU

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")  # shipped with CUDA builds of torch; a CPU-only torch has none

from lorax_server.adapters import lora  # noqa: E402
from lorax_server.adapters.lora import LoraModuleWeights, LoraSlots  # noqa: E402
from lorax_server.forward import SHORT_QUERIES, ForwardBatch  # noqa: E402
from lorax_server.layers.linear import Linear  # noqa: E402
from lorax_server.layers.moe import ExpertRows  # noqa: E402
from lorax_server.layers.triton import lora as kernels  # noqa: E402

IN = 24
PART_SIZES = [12, 4, 4]  # a fused q|k|v with fewer kv heads
PART_RANKS = [128, 4, 8]  # the largest rank of each part in the stack
SLOTS = 3

pytestmark = pytest.mark.usefixtures("lora_torch_plans")


def i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def random_stacks(dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """a [slots, in, R] and each part's b [slots, r, out], laid out as `LoraSlots` stacks them: slot 1
    has rank 4 in part 0 (zeros beyond it), slot 2 skips part 1 (zeros)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, IN, sum(PART_RANKS), generator=g) / IN**0.5
    bs = [torch.randn(SLOTS, r, n, generator=g) * 0.1 for r, n in zip(PART_RANKS, PART_SIZES, strict=True)]
    a[1, :, 4:128], bs[0][1, 4:] = 0, 0
    a[2, :, 128:132], bs[1][2] = 0, 0
    return a.to(dtype), [b.to(dtype) for b in bs]


TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
# Tokens 0 and 11-12 have no adapter; the segment of slot -1 is an adapter absent from the linear.
SEGMENTS = [(1, 4, 2), (4, 11, 0), (13, 15, -1), (15, 22, 1), (22, 23, 0)]
ROW_SLOTS = [0, -1, 2, 2, 1, -1, 0, 1, -1]


def expand_all(expand, y: torch.Tensor, shrunk: torch.Tensor, bs: list[torch.Tensor], *rows, **kw) -> None:
    """Every fused part: its columns of shrunk into its columns of y."""
    r0 = out0 = 0
    for b in bs:
        expand(y, shrunk[:, r0 : r0 + b.shape[1]], b, *rows, out_offset=out0, **kw)
        r0, out0 = r0 + b.shape[1], out0 + b.shape[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sgmv_matches_its_torch_reference(dtype: torch.dtype):
    a, bs = random_stacks(dtype)
    x = torch.randn(24, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows = tuple(i32(list(column)) for column in zip(*SEGMENTS, strict=True))
    shrunk = kernels.sgmv_shrink(x, a, *rows, max_len=7)
    expected = kernels.sgmv_shrink_torch(x, a, *rows)
    torch.testing.assert_close(shrunk, expected, **TOL[dtype])
    assert not shrunk[[0, 11, 12, 13, 14, 23]].any()  # no adapter, slot -1, past the last segment
    y0 = torch.randn(24, sum(PART_SIZES), generator=torch.Generator().manual_seed(2)).to(dtype)
    y, y_ref = y0.clone(), y0.clone()
    expand_all(kernels.sgmv_expand, y, expected, bs, *rows)  # the longest segment read from the device
    expand_all(kernels.sgmv_expand_torch, y_ref, expected, bs, *rows)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert torch.equal(y[[0, 11, 12, 13, 14, 23]], y0[[0, 11, 12, 13, 14, 23]])


# bfloat16 too: the BGMV kernels multiply in float32 without tl.dot (whose bfloat16 form the
# interpreter gets wrong, so the SGMV kernels are checked in bfloat16 only by the CUDA compile).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bgmv_matches_its_torch_reference(dtype: torch.dtype):
    a, bs = random_stacks(dtype)
    x = torch.randn(len(ROW_SLOTS), IN, generator=torch.Generator().manual_seed(3)).to(dtype)
    row_slot = i32(ROW_SLOTS)
    shrunk = kernels.bgmv_shrink(x, a, row_slot)
    expected = kernels.bgmv_shrink_torch(x, a, row_slot)
    torch.testing.assert_close(shrunk, expected, **TOL[dtype])
    base = [i for i, s in enumerate(ROW_SLOTS) if s < 0]
    assert not shrunk[base].any()
    y0 = torch.randn(len(ROW_SLOTS), sum(PART_SIZES), generator=torch.Generator().manual_seed(4)).to(dtype)
    y, y_ref = y0.clone(), y0.clone()
    expand_all(kernels.bgmv_expand, y, expected, bs, row_slot)
    expand_all(kernels.bgmv_expand_torch, y_ref, expected, bs, row_slot)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert torch.equal(y[base], y0[base])


def test_kernels_read_strided_inputs():
    """x as a column view of a wider tensor and y's columns beyond the part left alone."""
    a, bs = random_stacks(torch.float32)
    wide = torch.randn(9, 2 * IN, generator=torch.Generator().manual_seed(5))
    x = wide[:, IN:]
    row_slot = i32(ROW_SLOTS)
    torch.testing.assert_close(
        kernels.bgmv_shrink(x, a, row_slot), kernels.bgmv_shrink_torch(x.contiguous(), a, row_slot)
    )
    rows = (i32([0, 4]), i32([4, 9]), i32([1, 0]))
    shrunk = kernels.sgmv_shrink(x, a, *rows, max_len=5)
    torch.testing.assert_close(shrunk, kernels.sgmv_shrink_torch(x.contiguous(), a, *rows))
    y = torch.zeros(9, 30)
    kernels.sgmv_expand(y, shrunk[:, 128:132], bs[1], *rows, out_offset=20, max_len=5)
    assert not y[:, :20].any() and not y[:, 24:].any() and y[:, 20:24].any()


# LoraSlots: the kernels against the torch plans and the dense update.

LINEAR_IN = 16
ADAPTERS = {1: {0: 4, 1: 4, 2: 4}, 2: {0: 128, 2: 8}, 3: {1: 3}, 5: {0: 8, 1: 8, 2: 8}}  # index → {part: rank}
CASES = {
    "grouped by adapter, base rows first": (10, [(2, 4, 1), (4, 5, 2), (5, 8, 3), (8, 10, 5)]),
    "one adapter": (6, [(1, 6, 2)]),
    "base rows between segments": (12, [(0, 3, 2), (4, 6, 1), (9, 12, 5)]),
    "an adapter absent from this linear": (9, [(0, 3, 1), (3, 5, 4), (5, 9, 2)]),
}


def adapted_linear(adapters: dict[int, dict[int, int]]) -> Linear:
    weight = torch.randn(sum(PART_SIZES), LINEAR_IN, generator=torch.Generator().manual_seed(0))
    linear = Linear(weight, None, PART_SIZES, ["q", "k", "v"], PART_SIZES)
    linear.lora = LoraSlots(linear)
    for index, parts in adapters.items():
        weights = {}
        for p, r in parts.items():
            g = torch.Generator().manual_seed(index * 10 + p)
            a, b = torch.randn(r, LINEAR_IN, generator=g), torch.randn(PART_SIZES[p], r, generator=g)
            weights[p] = LoraModuleWeights(a / r**0.5, b, 0.5 + index / 10)
        linear.lora.install(index, weights)
    return linear


def dense_reference(linear: Linear, x: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
    y = x.double() @ linear.weight.double().t()
    for start, end, index in segments:
        installed = linear.lora.by_adapter.get(index)
        for part, w in (installed.parts if installed else {}).items():
            lo, hi = linear.lora.part_bounds[part]
            y[start:end, lo:hi] += x[start:end].double() @ w.delta().double().t()
    return y


def batch(segments: list[tuple[int, int, int]], num_tokens: int, decode: bool) -> ForwardBatch:
    """Decode: one token per sequence; prefill: one prompt of every token."""
    ids = torch.zeros(num_tokens, dtype=torch.int64)
    lens = [1] * num_tokens if decode else [num_tokens]
    tables = torch.zeros(len(lens), 4, dtype=torch.int64) if decode else torch.arange(4)[None]
    return ForwardBatch.build(ids, lens, lens, tables, 4, lora_segments=segments)


@pytest.fixture
def triton_kernels():
    lora.set_kernels("triton")
    yield
    lora.set_kernels("torch")


def run_both(linear: Linear, x: torch.Tensor, make_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear's output with the torch plans, then with the kernels (fresh rows each time)."""
    assert lora.kernels() == "torch"
    plain = linear(x, make_rows())
    lora.set_kernels("triton")
    try:
        return plain, linear(x, make_rows())
    finally:
        lora.set_kernels("torch")


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("case", CASES)
def test_slots_with_kernels_match_the_torch_plans_and_the_dense_update(case: str, decode: bool):
    num_tokens, segments = CASES[case]
    linear = adapted_linear(ADAPTERS)
    x = torch.randn(num_tokens, LINEAR_IN, generator=torch.Generator().manual_seed(1))
    metas = []

    def rows() -> ForwardBatch:
        metas.append(batch(segments, num_tokens, decode))
        return metas[-1]

    plain, fast = run_both(linear, x, rows)
    torch.testing.assert_close(fast.double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    plan = metas[-1].lora_kernel_rows(linear.lora._stacked.adapters)
    # BGMV on decode steps and other short queries (a row and its drafts), SGMV on prompts
    assert (plan.row_slot is not None) == (decode or num_tokens <= SHORT_QUERIES)


def held(stacked: lora._Stacked) -> tuple[int, ...]:
    """The adapters a kept stack holds, in slot order (its spare slots left out)."""
    return tuple(index for index in stacked.adapters if index)


def test_an_adapter_absent_from_the_linear_gets_no_slot(triton_kernels):
    linear = adapted_linear(ADAPTERS)
    num_tokens, segments = CASES["an adapter absent from this linear"]
    x = torch.randn(num_tokens, LINEAR_IN, generator=torch.Generator().manual_seed(4))
    meta = batch(segments, num_tokens, decode=False)
    out = linear(x, meta)
    torch.testing.assert_close(out.double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4)
    assert held(linear.lora._stacked) == (1, 2)  # no zero slot for adapter 4
    assert meta.lora_kernel_rows((1, 2)).seg_slot.tolist() == [0, -1, 1]


def test_kept_stack_and_rows_serve_every_linear_of_a_step(triton_kernels):
    linear, other = adapted_linear(ADAPTERS), adapted_linear({1: {0: 4}, 2: {2: 8}})
    x = torch.randn(10, LINEAR_IN, generator=torch.Generator().manual_seed(2))
    segments = CASES["grouped by adapter, base rows first"][1]
    meta = batch(segments, 10, decode=True)
    linear(x, meta)
    other(x, meta)
    kept = linear.lora._stacked
    assert held(kept) == (1, 2, 3, 5) and held(other.lora._stacked) == (1, 2)
    assert len({id(rows) for rows in meta._lora_kernel_rows.values()}) == 2  # one per stack order
    fewer = [(0, 2, 5), (2, 3, 3)]  # requests finished: a stack twice the batch's size still serves
    out = linear(x, batch(fewer, 10, decode=True))
    assert linear.lora._stacked is kept
    torch.testing.assert_close(out.double(), dense_reference(linear, x, fewer), rtol=1e-5, atol=1e-4)
    linear.lora.remove(5)  # the stack holds a copy of 5: dropped
    assert linear.lora._stacked is None


def test_adapters_joining_the_batch_take_free_slots_of_the_kernels_stack(triton_kernels):
    """As with the CPU kernel: a new adapter's prompt step writes it into a spare slot of the kept stack,
    the decode step after it reads that stack; when the spare slots are gone the stack is rebuilt with
    the running batch's adapters too; new adapters take the slots of finished ones."""
    linear = adapted_linear({i: {0: 4, 1: 4, 2: 4} for i in range(1, 10)})

    def step(segments: list[tuple[int, int, int]], decode: bool, seed: int) -> None:
        tokens = max(end for _, end, _ in segments)
        x = torch.randn(tokens, LINEAR_IN, generator=torch.Generator().manual_seed(seed))
        out = linear(x, batch(segments, tokens, decode))
        torch.testing.assert_close(out.double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4)

    running = [(0, 1, 1), (1, 2, 2)]
    step(running, decode=True, seed=1)
    first = linear.lora._stacked
    assert first.adapters == (1, 2, 0, 0, 0, 0) and not first.tiled
    for index in range(3, 8):  # five adapters join one by one: the fifth finds no spare slot
        step([(0, 3, index)], decode=False, seed=10 + index)  # its prompt step
        kept = linear.lora._stacked
        assert (kept is first) == (index < 7) and set(held(kept)) == set(range(1, index + 1))
        running.append((len(running), len(running) + 1, index))
        step(running, decode=True, seed=20 + index)  # the decode step with it
        assert linear.lora._stacked is kept
    running = running[:2]  # adapters 3-7 finished
    step(running, decode=True, seed=2)
    kept = linear.lora._stacked
    step([(0, 2, 8), (2, 4, 9)], decode=False, seed=3)  # two more join: spare slots or finished ones'
    assert linear.lora._stacked is kept and {1, 2, 8, 9} <= set(held(kept))
    step([*running, (2, 3, 8), (3, 4, 9)], decode=True, seed=4)
    assert linear.lora._stacked is kept


def test_expert_rows_grow_one_stack_across_steps(triton_kernels):
    """A MoE expert's rows change adapters at every step: the stack grows to hold them instead of
    being restacked each time."""
    linear = adapted_linear(ADAPTERS)
    x = torch.randn(8, LINEAR_IN, generator=torch.Generator().manual_seed(3))
    steps = [[(0, 3, 1)], [(0, 2, 2), (2, 5, 4), (5, 8, 1)], [(1, 4, 5)], [(0, 3, 1), (3, 8, 5)]]
    stacks = []
    for segments in steps:
        out = linear(x, ExpertRows(segments))
        stacks.append(linear.lora._stacked)
        torch.testing.assert_close(out.double(), dense_reference(linear, x, segments), rtol=1e-5, atol=1e-4)
    assert [held(s) for s in stacks[1:]] == [(2, 1), (5, 2, 1), (5, 2, 1)]  # larger ranks: restacked
    assert stacks[3] is stacks[2]


def test_switch_names():
    assert lora.kernels() == "torch"
    with pytest.raises(ValueError, match="unknown LoRA kernels"):
        lora.set_kernels("cuda")
    assert lora.kernels() == "torch"


# A tiny Llama: prefill and decode steps of a mixed batch, the switch on and off.


@pytest.fixture(scope="module")
def llama_with_adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from tiny_models import make_lora_adapter

    tmp = tmp_path_factory.mktemp("triton_lora")
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wide = make_lora_adapter(llama_dir, tmp / "r4", 1, r=4, lora_alpha=8, target_modules=every)
    narrow = make_lora_adapter(llama_dir, tmp / "r128", 2, r=128, lora_alpha=64, target_modules=["k_proj", "up_proj"])
    return llama_dir, [str(wide), str(narrow)]


def counted_kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the kernel launches (the switch must really route through them)."""
    calls = dict.fromkeys(["sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand"], 0)
    for name in calls:
        kernel = getattr(kernels, name)

        def counted(*args, _kernel=kernel, _name=name, **kw):
            calls[_name] += 1
            return _kernel(*args, **kw)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def with_and_without_kernels(run) -> tuple:
    plain = run()
    lora.set_kernels("triton")
    try:
        return plain, run()
    finally:
        lora.set_kernels("torch")


def test_llama_logits_and_tokens_do_not_change_with_the_kernels(llama_with_adapters, monkeypatch):
    from tp_ranks import mixed_batch_run

    model_dir, adapters = llama_with_adapters
    calls = counted_kernels(monkeypatch)
    plain, fast = with_and_without_kernels(lambda: mixed_batch_run(str(model_dir), adapters))
    assert all(calls.values()), calls  # prefill through SGMV, decode steps through BGMV
    for name in ("prefill", "decoded"):
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-4)
        assert torch.equal(fast[name].argmax(-1), plain[name].argmax(-1))


def test_mixtral_expert_adapters_do_not_change_with_the_kernels(tmp_path: Path, monkeypatch):
    """MoE experts' rows go through SGMV too (adapters on every expert, on some experts, on attention)."""
    from ragged_runs import prompts, run_ours
    from test_expert_lora import ADAPTERS as EXPERT_ADAPTERS
    from test_expert_lora import EXPERTS, write_adapter
    from tiny_models import make_model
    from transformers import MixtralConfig, MixtralForCausalLM

    from lorax_server.adapters.manager import AdapterManager, AdapterRequest
    from lorax_server.layers.attention import TorchAttention
    from lorax_server.models.loader import load_model

    base = make_model(MixtralConfig, MixtralForCausalLM, tmp_path / "base", num_local_experts=EXPERTS,
                      num_experts_per_tok=2, sliding_window=None)  # fmt: skip
    model = load_model(base, TorchAttention(4), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for i, (name, (r, alpha, modules)) in enumerate(EXPERT_ADAPTERS.items(), start=1):
        request = AdapterRequest(ids=(str(write_adapter(tmp_path / name, i, r, alpha, modules)),), source="local")
        manager.install(i, request, manager.prepare(request))
    batch = prompts(model.config.vocab_size, [7, 3, 12, 5])
    calls = counted_kernels(monkeypatch)
    (plain_prefill, plain), (fast_prefill, fast) = with_and_without_kernels(
        lambda: run_ours(model, batch, 4, adapters=[0, 1, 2, 1])
    )
    assert calls["sgmv_shrink"] and calls["bgmv_shrink"]
    expert = manager.targets["model.layers.0.block_sparse_moe.experts.2.w2"][0]
    assert expert.lora._stacked is not None  # the torch plans loop over experts' rows: only the kernels stack them
    torch.testing.assert_close(torch.cat(fast_prefill), torch.cat(plain_prefill), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))
