"""The Triton paged-attention backend (layers/triton/attention.py), run by Triton's interpreter on the
CPU, against the torch backend's gather-and-SDPA path, which is its reference: decode rows, prompt
rows and prompt chunks after cached tokens in one batch, ragged lengths, block tables with holes and
garbage in unused blocks, GQA and MQA, sliding windows, soft-capping, ALiBi, block sizes 16 and 32,
head_dim 80, float16/bfloat16 and float8 caches; a tiny Llama with two LoRA adapters in a mixed batch;
the start-up choice of backend (`select_backend`, `--attention-backend`) and the flash-attn glue."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

# Before anything defines a Triton kernel: kernels are bound to the interpreter when they are defined
# (and Triton reads the variable again when they run, so it stays set).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")  # shipped with CUDA builds of torch; a CPU-only torch has none

from lorax_server import cli  # noqa: E402
from lorax_server.forward import ForwardBatch  # noqa: E402
from lorax_server.kv_cache import to_fp8_kv  # noqa: E402
from lorax_server.layers import attention  # noqa: E402
from lorax_server.layers.attention import BackendUnavailable, TorchAttention, alibi_slopes, select_backend  # noqa: E402
from lorax_server.layers.flash_attention import FlashAttention  # noqa: E402
from lorax_server.layers.triton.attention import TritonAttention  # noqa: E402

MIXED = ([1, 7, 1, 20, 5], [40, 7, 3, 52, 37])  # decode, prompt, decode, long prompt, chunk after 32 cached


def paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    block_size: int,
    kv_heads: int,
    head_dim: int,
    seed: int,
    garbage: float = 1e6,
) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
    """A batch over a cache whose blocks are scattered and unordered: each sequence gets random
    blocks, the table's tail past its length points at a garbage block, and unused blocks and the
    unused tail of each last block hold `garbage`, so any read outside a context shows in the output."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 7
    order = torch.randperm(num_blocks, generator=g)
    spare = int(order[-1])
    tables = torch.full((len(context_lens), max(needed) + 2), spare, dtype=torch.int32)
    taken = 0
    for row, n in enumerate(needed):
        tables[row, :n] = order[taken : taken + n]
        taken += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    cache_k, cache_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for row, n in enumerate(context_lens):
        for pos in range(n):
            used[tables[row, pos // block_size], pos % block_size] = True
    for cache in (cache_k, cache_v):
        cache[~used] = garbage
    input_ids = torch.zeros(sum(query_lens), dtype=torch.int64)
    return ForwardBatch.build(input_ids, query_lens, context_lens, tables, block_size), cache_k, cache_v


def attend_both(meta, q, cache_k, cache_v, block_size, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    reference = TorchAttention(block_size, cpu_kernels=False).attend(q, cache_k, cache_v, meta, 0.3, **kwargs)
    meta.backend_state.clear()
    triton = TritonAttention(block_size).attend(q, cache_k, cache_v, meta, 0.3, **kwargs)
    meta.backend_state.clear()
    assert triton.shape == reference.shape and triton.dtype == reference.dtype
    return reference, triton


def variant_kwargs(variant: str, heads: int) -> dict:
    kwargs = {}
    if "window" in variant:
        kwargs["window"] = 9
    if "softcap" in variant:
        kwargs["softcap"] = 2.5
    if "alibi" in variant:
        kwargs["alibi_slopes"] = alibi_slopes(heads)
    return kwargs


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 32), (4, 2, 32), (3, 1, 80)])
@pytest.mark.parametrize("variant", ["plain", "window", "softcap", "alibi", "window+alibi+softcap"])
def test_mixed_batch_matches_torch(block_size: int, heads: int, kv_heads: int, head_dim: int, variant: str):
    """Decode rows, whole prompts and a prompt chunk after cached tokens, in one launch."""
    meta, cache_k, cache_v = paged_batch(*MIXED, block_size, kv_heads, head_dim, seed=heads + block_size)
    q = torch.randn(sum(MIXED[0]), heads, head_dim, generator=torch.Generator().manual_seed(1))
    reference, triton = attend_both(meta, q, cache_k, cache_v, block_size, **variant_kwargs(variant, heads))
    torch.testing.assert_close(triton, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [
        ([1, 1, 1, 1, 1, 1], [1, 5, 16, 17, 47, 70]),  # decode only: the small query tiles
        ([3, 19, 1], [3, 19, 1]),  # prompts only, one of them a single token
        ([40], [40]),  # one prompt longer than a query tile
    ],
)
@pytest.mark.parametrize("variant", ["plain", "window+alibi+softcap"])
def test_decode_only_and_prompt_only_batches(query_lens: list[int], context_lens: list[int], variant: str):
    meta, cache_k, cache_v = paged_batch(query_lens, context_lens, 16, 2, 64, seed=len(query_lens))
    q = torch.randn(sum(query_lens), 4, 64, generator=torch.Generator().manual_seed(2))
    reference, triton = attend_both(meta, q, cache_k, cache_v, 16, **variant_kwargs(variant, 4))
    torch.testing.assert_close(triton, reference, rtol=1e-5, atol=1e-5)


def test_many_heads_per_kv_head():
    """MQA with 32 query heads: one token per query tile, the group fills the tile's rows."""
    meta, cache_k, cache_v = paged_batch([1, 6], [21, 6], 16, 1, 16, seed=8)
    q = torch.randn(7, 32, 16, generator=torch.Generator().manual_seed(3))
    reference, triton = attend_both(meta, q, cache_k, cache_v, 16, alibi_slopes=alibi_slopes(32))
    torch.testing.assert_close(triton, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_caches(dtype: torch.dtype, tol: float):
    meta, cache_k, cache_v = paged_batch(*MIXED, 16, 2, 32, seed=9, garbage=3e4)  # finite in float16
    q = torch.randn(sum(MIXED[0]), 4, 32, generator=torch.Generator().manual_seed(4))
    reference, triton = attend_both(meta, q.to(dtype), cache_k.to(dtype), cache_v.to(dtype), 16, window=20, softcap=4.0)
    torch.testing.assert_close(triton, reference, rtol=tol, atol=tol)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_float8_cache_with_scales(q_dtype: torch.dtype):
    """The cache holds k / k_scale and v / v_scale in float8_e4m3fn; both backends widen and rescale."""
    meta, cache_k, cache_v = paged_batch(*MIXED, 32, 2, 32, seed=10, garbage=400.0)
    k_scale, v_scale = 0.02, 0.05
    fp8_k, fp8_v = to_fp8_kv(cache_k * 3, k_scale), to_fp8_kv(cache_v * 3, v_scale)
    q = torch.randn(sum(MIXED[0]), 4, 32, generator=torch.Generator().manual_seed(5)).to(q_dtype)
    reference, triton = attend_both(meta, q, fp8_k, fp8_v, 32, k_scale=k_scale, v_scale=v_scale)
    tol = 1e-5 if q_dtype == torch.float32 else 5e-3
    torch.testing.assert_close(triton, reference, rtol=tol, atol=tol)


def test_nothing_outside_the_contexts_is_read():
    """NaN in every unused slot (and the spare block the tables' tails point at) leaves the output
    finite and equal to the reference over a clean cache: the kernel never loads those slots."""
    meta, dirty_k, dirty_v = paged_batch(*MIXED, 16, 2, 32, seed=11, garbage=float("nan"))
    clean_k, clean_v = dirty_k.nan_to_num(0.0), dirty_v.nan_to_num(0.0)
    q = torch.randn(sum(MIXED[0]), 4, 32, generator=torch.Generator().manual_seed(6))
    reference = TorchAttention(16, cpu_kernels=False).attend(q, clean_k, clean_v, meta, 0.3, window=12)
    triton = TritonAttention(16).attend(q, dirty_k, dirty_v, meta, 0.3, window=12)
    torch.testing.assert_close(triton, reference, rtol=1e-5, atol=1e-5)


def test_strided_queries_and_metadata_built_once(monkeypatch: pytest.MonkeyPatch):
    """q as a view into a fused qkv row (as the model passes it); the per-forward work list is built
    on the first layer, reused by the next, with no host read-back of device values."""
    meta, cache_k, cache_v = paged_batch(*MIXED, 16, 2, 32, seed=12)
    qkv = torch.randn(sum(MIXED[0]), 8 * 32, generator=torch.Generator().manual_seed(7))
    q = qkv[:, : 4 * 32].view(-1, 4, 32)
    assert not q.is_contiguous()
    reference = TorchAttention(16, cpu_kernels=False).attend(q.contiguous(), cache_k, cache_v, meta, 0.3)
    backend = TritonAttention(16)
    built = []
    real_build = type(backend)._work

    def counting(self, meta, block_q):  # noqa: ANN001, ANN202
        if (self.name, block_q) not in meta.backend_state:
            built.append(block_q)
        return real_build(self, meta, block_q)

    monkeypatch.setattr(TritonAttention, "_work", counting)
    for name in ("item", "tolist", "__int__", "__bool__"):  # what would read device values back
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name: pytest.fail(f"Tensor.{_n} in attend"))
    first = backend.attend(q, cache_k, cache_v, meta, 0.3)
    second = backend.attend(q, cache_k, cache_v, meta, 0.3)
    monkeypatch.undo()
    assert built == [built[0]]
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


def test_kernel_compiles_for_cuda():
    """The interpreter accepts what a GPU build may refuse: build the attention and LoRA kernels for
    sm_80/sm_90 (no GPU needed), in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).parents[1]), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("triton_cuda_compile.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    if lines and lines[0].startswith("SKIP"):
        pytest.skip(lines[0])
    failed = [line for line in lines if not line.startswith("ok ")]
    assert lines and not failed, "\n".join(failed)


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from tiny_models import make_lora_adapter

    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "o_proj", "down_proj"]]
    return [
        str(make_lora_adapter(llama_dir, tmp_path_factory.mktemp(f"lora{i}"), seed=i, r=4, target_modules=t))
        for i, t in enumerate(targets)
    ]


@torch.no_grad()
def mixed_adapter_run(model_dir: Path, adapters: list[str], backend) -> tuple[list[torch.Tensor], list]:  # noqa: ANN001
    """Three prompts (base, adapter 1, adapter 2) prefilled together; then greedy decode steps, the
    first of which also prefills a fourth prompt (adapter 1) beside the decoding rows. Returns each
    step's logits and tokens."""
    from lorax_server.adapters.lora import segments_of
    from lorax_server.adapters.manager import AdapterManager, AdapterRequest
    from lorax_server.kv_cache import BlockManager, KVCache
    from lorax_server.models.loader import load_model

    block = 16
    model = load_model(model_dir, backend, torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for i, path in enumerate(adapters, start=1):
        request = AdapterRequest(ids=(path,), source="local")
        manager.install(i, request, manager.prepare(request))
    layers, kv_heads, head_dim, dtype = model.cache_geometry
    cache = KVCache(layers, 32, block, kv_heads, head_dim, dtype, torch.device("cpu"))
    blocks = BlockManager(32, block)
    lengths, adapter_of = [9, 21, 4, 13], [0, 1, 2, 1]
    tables = torch.tensor([blocks.allocate(n + 8) + [0] * (3 - blocks.blocks_for(n + 8)) for n in lengths])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in lengths]
    rows, q_lens, ctx, ids = [0, 1, 2], lengths[:3], lengths[:3], torch.cat(prompts[:3])
    logits, tokens = [], []
    for step in range(4):
        order = sorted(range(len(rows)), key=lambda i: adapter_of[rows[i]])  # rows grouped by adapter
        starts = torch.tensor([0, *q_lens]).cumsum(0)
        ids = torch.cat([ids[starts[i] : starts[i + 1]] for i in order])
        rows, q_lens, ctx = [rows[i] for i in order], [q_lens[i] for i in order], [ctx[i] for i in order]
        segments = segments_of([adapter_of[r] for r in rows], q_lens)
        meta = ForwardBatch.build(ids, q_lens, ctx, tables[rows], block, lora_segments=segments)
        out = model.forward(meta, cache)  # [rows, vocab]: each row's last token
        logits.append(dict(zip(rows, out, strict=True)))
        tokens.append(dict(zip(rows, out.argmax(-1).tolist(), strict=True)))
        ids, q_lens, ctx = out.argmax(-1), [1] * len(rows), [n + 1 for n in ctx]
        if step == 0:  # the fourth prompt joins the decoding rows
            rows, q_lens, ctx = [*rows, 3], [*q_lens, lengths[3]], [*ctx, lengths[3]]
            ids = torch.cat([ids, prompts[3]])
    return logits, tokens


def test_tiny_llama_with_two_adapters_matches_the_torch_backend(llama_dir: Path, adapters: list[str]):
    ref_logits, ref_tokens = mixed_adapter_run(llama_dir, adapters, TorchAttention(16, cpu_kernels=False))
    logits, tokens = mixed_adapter_run(llama_dir, adapters, TritonAttention(16))
    assert tokens == ref_tokens
    for step, ref_step in zip(logits, ref_logits, strict=True):
        for row in ref_step:
            torch.testing.assert_close(step[row], ref_step[row], rtol=0, atol=1e-4)


CPU = torch.device("cpu")


def test_select_backend_choices(monkeypatch: pytest.MonkeyPatch):
    assert isinstance(select_backend(CPU, 16), TorchAttention)  # the default off CUDA
    assert isinstance(select_backend(CPU, 16, "torch"), TorchAttention)
    triton = select_backend(CPU, 32, "triton")  # allowed on the CPU under the interpreter only
    assert isinstance(triton, TritonAttention) and triton.name == "triton" and triton.block_size == 32
    # On CUDA the default is Triton when it imports, torch when it does not (nothing is allocated here).
    assert isinstance(select_backend(torch.device("cuda", 0), 16), TritonAttention)
    monkeypatch.setattr(attention, "_imports", lambda package: package != "triton")
    assert isinstance(select_backend(torch.device("cuda", 0), 16), TorchAttention)
    with pytest.raises(BackendUnavailable, match="`triton` package"):
        select_backend(torch.device("cuda", 0), 16, "triton")


def test_select_backend_errors(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU.*TRITON_INTERPRET=1"):
        select_backend(CPU, 16, "triton")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    with pytest.raises(BackendUnavailable, match="`flash_attn` package"):
        select_backend(torch.device("cuda", 0), 16, "flash")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        select_backend(CPU, 16, "xformers")


def test_attention_backend_flag(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    args = cli._parser().parse_args(["serve", "m", "--attention-backend", "triton"])
    assert cli._shard_config(args).attention_backend == "triton"
    assert cli._shard_config(cli._parser().parse_args(["serve", "m"])).attention_backend is None
    monkeypatch.setenv("ATTENTION_BACKEND", "torch")
    assert cli._parser().parse_args(["serve", "m"]).attention_backend == "torch"
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "m", "--attention-backend", "xformers"])
    assert "invalid choice" in capsys.readouterr().err
    # A backend that cannot run stops `serve` before anything is downloaded or loaded.
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="error: attention backend 'flash' needs the `flash_attn` package"):
        cli.main(["serve", "/nonexistent/model", "--attention-backend", "flash"])


def test_the_lora_kernels_follow_the_attention_backend(monkeypatch: pytest.MonkeyPatch):
    from lorax_server.adapters import lora

    chosen = []
    monkeypatch.setattr(lora, "set_kernels", chosen.append)  # record, leave the process's choice alone
    for name, expected in (("triton", TritonAttention), ("torch", TorchAttention)):
        config = cli._shard_config(cli._parser().parse_args(["serve", "m", "--attention-backend", name]))
        assert isinstance(cli.choose_kernels(config, CPU), expected)
    assert chosen == ["triton", "torch"]


def fake_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **options) -> torch.Tensor:  # noqa: ANN001
    """flash-attn's documented semantics, written out per sequence: causal aligned to the end of the
    keys, window (left, right) around query i + sk - sq, ALiBi bias -slope·|i + sk - sq - j|."""
    assert options.keys() == {"softmax_scale", "causal", "window_size", "softcap", "alibi_slopes"}
    assert options["causal"] and cu_q.dtype == cu_k.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    (left, right), softcap, slopes = options["window_size"], options["softcap"], options["alibi_slopes"]
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(cu_q.shape[0] - 1):
        qs, ks = q[cu_q[b] : cu_q[b + 1]].float(), k[cu_k[b] : cu_k[b + 1]].float()
        vs = v[cu_k[b] : cu_k[b + 1]].float()
        sq, sk = qs.shape[0], ks.shape[0]
        i = torch.arange(sq).view(-1, 1) + sk - sq
        j = torch.arange(sk).view(1, -1)
        s = torch.einsum("qhd,khd->hqk", qs, ks.repeat_interleave(group, 1)) * options["softmax_scale"]
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if slopes is not None:
            s = s - slopes.view(-1, 1, 1) * (i - j).abs()
        visible = j <= i + max(right, 0)  # causal wins over a right window
        if left >= 0:
            visible = visible & (j >= i - left)
        p = s.masked_fill(~visible, float("-inf")).softmax(-1)
        out[cu_q[b] : cu_q[b + 1]] = torch.einsum("hqk,khd->qhd", p, vs.repeat_interleave(group, 1)).to(q.dtype)
    return out


@pytest.mark.parametrize("variant", ["plain", "window+alibi+softcap"])
def test_flash_glue_against_flash_attn_semantics(monkeypatch: pytest.MonkeyPatch, variant: str):
    """The flash backend's packing and arguments, with a stand-in for flash_attn_varlen_func that
    follows flash-attn's documented semantics (no GPU here): it must agree with the torch backend."""
    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_flash_attn_varlen_func)
    )
    meta, cache_k, cache_v = paged_batch(*MIXED, 16, 2, 32, seed=13, garbage=3e4)  # finite in float16
    q = torch.randn(sum(MIXED[0]), 4, 32, generator=torch.Generator().manual_seed(8)).half()
    kwargs = variant_kwargs(variant, 4)
    reference = TorchAttention(16, cpu_kernels=False).attend(q, cache_k.half(), cache_v.half(), meta, 0.3, **kwargs)
    meta.backend_state.clear()
    flash = FlashAttention(16).attend(q, cache_k.half(), cache_v.half(), meta, 0.3, **kwargs)
    torch.testing.assert_close(flash, reference, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        FlashAttention(16).attend(q.float(), cache_k, cache_v, meta, 0.3)
