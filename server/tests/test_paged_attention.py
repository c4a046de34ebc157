"""The CPU paged attention kernels (layers/csrc/paged_attention.cpp), decode and prefill, against the torch
backend's gather-and-SDPA path, which is their reference: GQA and MQA, sliding windows, soft-capping,
ALiBi, block sizes 8, 16, 24 and 32, block tables with holes, ragged lengths, prompts behind cached
prefixes, and decode rows mixed with prompt rows."""

from __future__ import annotations

import pytest
import torch

from lorax_server.forward import ForwardBatch
from lorax_server.layers import paged_attention
from lorax_server.layers.attention import TorchAttention, alibi_slopes

pytestmark = pytest.mark.skipif(not paged_attention.kernel_available(), reason="the CPU kernel did not build")


def paged_batch(
    query_lens: list[int], context_lens: list[int], block_size: int, kv_heads: int, head_dim: int, seed: int
) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
    """A batch over a cache whose blocks are scattered: each sequence gets random blocks, the table's
    tail past its length points at a garbage block, and unused blocks hold huge values so that any
    read outside a sequence's context shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in context_lens]
    width = max(needed) + 2
    num_blocks = sum(needed) + 7
    order = torch.randperm(num_blocks, generator=g)
    garbage = int(order[-1])
    tables = torch.full((len(context_lens), width), garbage, dtype=torch.int32)
    taken = 0
    for row, n in enumerate(needed):
        tables[row, :n] = order[taken : taken + n]
        taken += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    cache_k, cache_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    for cache in (cache_k, cache_v):
        cache[garbage] = 1e6
        # Positions past each sequence's length inside its last block: garbage as well.
        for row, n in enumerate(context_lens):
            if n % block_size:
                cache[tables[row, n // block_size], n % block_size :] = -1e6
    input_ids = torch.zeros(sum(query_lens), dtype=torch.int64)
    return ForwardBatch.build(input_ids, query_lens, context_lens, tables, block_size), cache_k, cache_v


def attend_both(meta, q, cache_k, cache_v, block_size, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    reference = TorchAttention(block_size, cpu_kernels=False).attend(q, cache_k, cache_v, meta, 0.3, **kwargs)
    meta.backend_state.clear()
    kernel = TorchAttention(block_size).attend(q, cache_k, cache_v, meta, 0.3, **kwargs)
    return reference, kernel


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 8, 64), (8, 2, 32), (6, 1, 80)])
@pytest.mark.parametrize("variant", ["plain", "window", "softcap", "alibi", "window+alibi+softcap"])
def test_decode_matches_the_torch_path(block_size: int, heads: int, kv_heads: int, head_dim: int, variant: str):
    lengths = [1, 5, block_size, block_size + 1, 3 * block_size - 1, 70]
    meta, cache_k, cache_v = paged_batch([1] * len(lengths), lengths, block_size, kv_heads, head_dim, seed=heads)
    q = torch.randn(len(lengths), heads, head_dim, generator=torch.Generator().manual_seed(1))
    kwargs = {}
    if "window" in variant:
        kwargs["window"] = 9
    if "softcap" in variant:
        kwargs["softcap"] = 2.5
    if "alibi" in variant:
        kwargs["alibi_slopes"] = alibi_slopes(heads)
    reference, kernel = attend_both(meta, q, cache_k, cache_v, block_size, **kwargs)
    assert kernel.shape == reference.shape
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)


def test_one_long_sequence_is_split_across_threads():
    """Batch 1: the kernel splits the kv heads into tasks; every head's answer stays right."""
    meta, cache_k, cache_v = paged_batch([1], [300], 16, 4, 64, seed=3)
    q = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(2))
    previous = torch.get_num_threads()
    torch.set_num_threads(max(previous, 2))
    try:
        reference, kernel = attend_both(meta, q, cache_k, cache_v, 16)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)


def test_decode_rows_mixed_with_prompt_rows():
    """A chunked-prefill step: decode rows take the kernel, prompt rows the padded path, one output."""
    query_lens, context_lens = [1, 7, 1, 1, 20], [40, 7, 3, 65, 52]
    meta, cache_k, cache_v = paged_batch(query_lens, context_lens, 16, 2, 32, seed=5)
    q = torch.randn(sum(query_lens), 4, 32, generator=torch.Generator().manual_seed(4))
    reference, kernel = attend_both(meta, q, cache_k, cache_v, 16, window=30)
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)


VARIANTS = {
    "plain": {},
    "window": {"window": 9},
    "softcap": {"softcap": 2.5},
    "alibi": {"alibi": True},
    "window+alibi+softcap": {"window": 21, "softcap": 2.5, "alibi": True},
}


def variant_kwargs(variant: str, heads: int) -> dict:
    kwargs = dict(VARIANTS[variant])
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = alibi_slopes(heads)
    return kwargs


@pytest.mark.parametrize("block_size", [8, 16, 24, 32])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 8, 64), (8, 2, 40), (6, 1, 80)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_matches_the_torch_path(block_size: int, heads: int, kv_heads: int, head_dim: int, variant: str):
    """Whole prompts (2 to 70 tokens, some past one query tile of 16) and prompts behind cached prefixes
    (the new tokens are the last of a longer context), ragged, in one call."""
    query_lens = [2, 17, 9, 40, 33, 5, 70]
    context_lens = [2, 17, 60, 40, 97, 5 + 3 * block_size, 70]
    seed = heads + block_size
    meta, cache_k, cache_v = paged_batch(query_lens, context_lens, block_size, kv_heads, head_dim, seed=seed)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=torch.Generator().manual_seed(3))
    reference, kernel = attend_both(meta, q, cache_k, cache_v, block_size, **variant_kwargs(variant, heads))
    assert kernel.shape == reference.shape
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)


def test_prefill_of_a_sequence_does_not_depend_on_its_batch():
    """A prompt's outputs are bit for bit the same alone and among others, whichever tokens share its
    task: the key tiles sit at fixed positions."""
    query_lens, context_lens = [30, 12, 45], [50, 12, 45]
    meta, cache_k, cache_v = paged_batch(query_lens, context_lens, 16, 2, 32, seed=8)
    q = torch.randn(sum(query_lens), 4, 32, generator=torch.Generator().manual_seed(6))
    together = TorchAttention(16).attend(q, cache_k, cache_v, meta, 0.3, window=25)
    alone_meta = ForwardBatch.build(torch.zeros(30, dtype=torch.int64), [30], [50], meta.block_tables[:1], 16)
    alone = TorchAttention(16).attend(q[:30], cache_k, cache_v, alone_meta, 0.3, window=25)
    assert torch.equal(together[:30], alone)
    # The last 13 of its new tokens as a later chunk (their first row starts another task) agree too.
    chunk_meta = ForwardBatch.build(torch.zeros(13, dtype=torch.int64), [13], [50], meta.block_tables[:1], 16)
    chunk = TorchAttention(16).attend(q[17:30], cache_k, cache_v, chunk_meta, 0.3, window=25)
    assert torch.equal(together[17:30], chunk)


def test_decode_rows_of_a_prefill_call_match_a_decode_step():
    """A chunked-prefill step's decode rows are attended exactly as a decode step would attend them."""
    query_lens, context_lens = [1, 20, 1], [40, 52, 65]
    meta, cache_k, cache_v = paged_batch(query_lens, context_lens, 16, 2, 32, seed=9)
    q = torch.randn(sum(query_lens), 4, 32, generator=torch.Generator().manual_seed(7))
    mixed = TorchAttention(16).attend(q, cache_k, cache_v, meta, 0.3)
    decode_meta = ForwardBatch.build(torch.zeros(2, dtype=torch.int64), [1, 1], [40, 65], meta.block_tables[[0, 2]], 16)
    decoded = TorchAttention(16).attend(q[[0, 21]], cache_k, cache_v, decode_meta, 0.3)
    assert torch.equal(mixed[[0, 21]], decoded)


def test_other_dtypes_and_the_switch_take_the_torch_path(monkeypatch: pytest.MonkeyPatch):
    meta, cache_k, cache_v = paged_batch([1, 1], [10, 33], 16, 2, 32, seed=6)
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(5))
    assert not paged_attention.kernel_applies(q.bfloat16(), cache_k.bfloat16())
    out = TorchAttention(16).attend(q.bfloat16(), cache_k.bfloat16(), cache_v.bfloat16(), meta, 0.3)
    assert out.dtype == torch.bfloat16

    monkeypatch.setenv("LORAX_CPU_KERNELS", "0")
    monkeypatch.setattr(paged_attention.EXTENSION, "_attempted", False)
    monkeypatch.setattr(paged_attention.EXTENSION, "_ops", None)
    assert not paged_attention.kernel_available()
    meta.backend_state.clear()
    fallback = TorchAttention(16).attend(q, cache_k, cache_v, meta, 0.3)
    meta.backend_state.clear()
    reference = TorchAttention(16, cpu_kernels=False).attend(q, cache_k, cache_v, meta, 0.3)
    assert torch.equal(fallback, reference)


def test_bad_shapes_are_refused():
    meta, cache_k, cache_v = paged_batch([1], [10], 16, 3, 32, seed=7)
    with pytest.raises(RuntimeError, match="share"):
        paged_attention.paged_decode_attention(
            torch.randn(1, 4, 32), cache_k, cache_v, meta.block_tables, meta.context_lens, 0.3
        )
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        paged_attention.paged_decode_attention(
            torch.randn(1, 3, 32), cache_k, cache_v, meta.block_tables, torch.tensor([10_000]), 0.3
        )


def test_bad_prefill_layouts_are_refused():
    meta, cache_k, cache_v = paged_batch([4, 3], [10, 3], 16, 1, 32, seed=10)
    tables, q = meta.block_tables, torch.randn(7, 2, 32)

    def call(starts: list[int], lens: list[int]) -> torch.Tensor:
        return paged_attention.paged_prefill_attention(
            q, cache_k, cache_v, tables, torch.tensor(starts), torch.tensor(lens), 0.3
        )

    assert call([0, 4], [10, 3]).shape == (7, 2, 32)
    with pytest.raises(RuntimeError, match="do not fit"):
        call([0, 4], [10, 2])  # 3 new tokens in a context of 2
    with pytest.raises(RuntimeError, match="do not fit"):
        call([0, 0], [10, 3])  # a sequence without new tokens
    with pytest.raises(RuntimeError, match="from row 0"):
        call([1, 4], [10, 3])
    with pytest.raises(RuntimeError, match="one query start"):
        call([0], [10, 3])
