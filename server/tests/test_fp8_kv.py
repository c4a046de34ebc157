"""`--quantize fp8-kv`: float8 weights and a float8_e4m3fn paged KV cache storing keys / k_scale and
values / v_scale per layer. The reference rounds keys and values through float8 with the same scales
inside transformers' attention (rounding is idempotent, so that equals caching the rounded values), on a
checkpoint whose linear weights are their float8 fake-quantization, computed here from the definition."""

from __future__ import annotations

import logging
import shutil
import types
from pathlib import Path

import pytest
import ragged_runs
import torch
import torch.nn.functional as F
from families import build_family
from quantized import quantized_linears, save_checkpoint
from ragged_runs import assert_matches, prompts, run_ours
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lorax_server.engine import CacheConfig, Engine
from lorax_server.forward import ForwardBatch
from lorax_server.kv_cache import BlockManager, KVCache
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model

FP8 = torch.float8_e4m3fn
CPU = torch.device("cpu")
LENGTHS = [7, 3, 12, 5]
STEPS = 8
REFERENCE_ATTENTION = "test_fp8_kv_sdpa"


def fake_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x rounded through float8_e4m3fn with `scale`, saturating at e4m3's largest finite value, 448."""
    return (x / scale).clamp(-448.0, 448.0).to(FP8).to(x.dtype) * scale


def fake_fp8_weight(w: torch.Tensor) -> torch.Tensor:
    """fp8 weights by definition: e4m3 with one scale per output channel (row), max |w| / 448."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return (w / scale).to(FP8).float() * scale


def _rounding_sdpa(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN202
    k_scale, v_scale = module.fp8_kv_scales  # set on every layer by `reference`: a missing one fails loudly
    return sdpa_attention_forward(
        module, query, fake_fp8(key, k_scale), fake_fp8(value, v_scale), attention_mask, **kwargs
    )


AttentionInterface.register(REFERENCE_ATTENTION, _rounding_sdpa)
AttentionMaskInterface.register(REFERENCE_ATTENTION, sdpa_mask)  # custom names get no mask otherwise


def reference(ref_dir: Path, scales: list[tuple[float, float]] | None = None, round_kv: bool = True):  # noqa: ANN201
    """transformers on `ref_dir`, rounding each layer's keys/values through float8 with `scales` (1.0)."""
    attn = REFERENCE_ATTENTION if round_kv else "sdpa"
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32, attn_implementation=attn).eval()
    for i, layer in enumerate(ref.model.layers):
        layer.self_attn.fp8_kv_scales = scales[i] if scales else (1.0, 1.0)
    return ref


def reference_checkpoint(model_dir: Path, ours, out: Path) -> Path:  # noqa: ANN001
    """`model_dir` with every linear our model quantized replaced by its float8 fake-quantization (the
    KV scales are given to the reference directly, so they are left out)."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.endswith(("k_scale", "v_scale", "kv_scale"))}
    linears = quantized_linears(ours)
    assert linears, "nothing was quantized"
    for linear in linears:
        for name in linear.part_names:
            tensors[f"{name}.weight"] = fake_fp8_weight(tensors[f"{name}.weight"])
        # Our format holds exactly these values (fused parts are quantized row by row, like each part).
        fused = torch.cat([tensors[f"{name}.weight"] for name in linear.part_names])
        assert torch.equal(linear.weight.dequantize(), fused), linear.part_names
    return save_checkpoint(model_dir, tensors, out)


def run_fp8(model, batch: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    """`run_ours`, with the KV cache in the dtype the model asks for (the helper allocates float32)."""
    made: list[KVCache] = []

    def cache(layers: int, blocks: int, size: int, kv_heads: int, head_dim: int, _dtype, device) -> KVCache:  # noqa: ANN001
        made.append(KVCache(layers, blocks, size, kv_heads, head_dim, model.cache_geometry[3], device))
        return made[-1]

    with monkeypatch.context() as patch:
        patch.setattr(ragged_runs, "KVCache", cache)
        out = run_ours(model, batch, STEPS)
    assert [c.keys[0].dtype for c in made] == [model.cache_geometry[3]]
    return out


# ---------------------------------------------------------------------------------------------- the cache


@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.01, 0.37)])
def test_float8_cache_attends_like_sdpa_on_rounded_keys_and_values(k_scale: float, v_scale: float) -> None:
    """Ragged prefill then one decode step, GQA (4 query heads on 2 KV heads), block size 4."""
    heads, kv_heads, d, block = 4, 2, 8, 4
    lengths = [5, 1, 9]
    totals = [n + 1 for n in lengths]  # the prompt, then one decoded token
    g = torch.Generator().manual_seed(0)
    q = [torch.randn(n, heads, d, generator=g) for n in totals]
    k = [torch.randn(n, kv_heads, d, generator=g) * 2 for n in totals]
    v = [torch.randn(n, kv_heads, d, generator=g) for n in totals]
    k[0][0, 0, 0] = 1e4  # beyond e4m3's range at any scale here: saturates, never NaN
    if k_scale != 1.0:
        assert (torch.cat(k).abs() / k_scale > 448).sum() > 10  # the scale really saturates some keys
    scale = d**-0.5
    blocks = BlockManager(16, block)
    tables = [blocks.allocate(n) for n in totals]
    width = max(len(t) for t in tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    cache = KVCache(1, 16, block, kv_heads, d, FP8, CPU)
    backend = TorchAttention(block)

    def step(part: list[slice], query_lens: list[int], context_lens: list[int]) -> torch.Tensor:
        meta = ForwardBatch.build(torch.zeros(sum(query_lens), dtype=torch.int64), query_lens, context_lens,
                                  tables, block)  # fmt: skip
        cat = [torch.cat([x[s] for x, s in zip(xs, part, strict=True)]) for xs in (q, k, v)]
        cache.write(0, meta.slots, cat[1], cat[2], k_scale, v_scale)
        return backend.attend(cat[0], cache.keys[0], cache.values[0], meta, scale, k_scale=k_scale, v_scale=v_scale)

    prefill = step([slice(0, n) for n in lengths], lengths, lengths).split(lengths)
    decode = step([slice(n, n + 1) for n in lengths], [1] * len(lengths), totals)
    assert cache.keys[0].dtype == FP8 and cache.keys[0].element_size() == 1
    for b, n in enumerate(lengths):
        qs = q[b].transpose(0, 1)[None]  # [1, heads, n + 1, d]
        ks, vs = (fake_fp8(x[b], s).transpose(0, 1)[None] for x, s in ((k, k_scale), (v, v_scale)))
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)[0]
        want = want.transpose(0, 1)  # [n + 1, heads, d]
        assert torch.isfinite(prefill[b]).all()
        assert (prefill[b] - want[:n]).abs().max() < 1e-5
        assert (decode[b] - want[n]).abs().max() < 1e-5
    # The stored bytes are exactly the rounded keys: a saturated 448, not NaN.
    stored = cache.keys[0].view(-1, kv_heads, d)[tables[0, 0] * block].float()
    assert stored[0, 0] == 448.0 and torch.equal(stored * k_scale, fake_fp8(k[0][0], k_scale))


def test_other_caches_store_exact_values_and_ignore_scales() -> None:
    cache = KVCache(1, num_blocks=2, block_size=2, kv_heads=1, head_dim=3, dtype=torch.float32, device=CPU)
    k = torch.randn(2, 1, 3)
    cache.write(0, torch.tensor([3, 0]), k, -k, k_scale=0.3, v_scale=7.0)
    assert torch.equal(cache.keys[0][1, 1], k[0]) and torch.equal(cache.values[0][0, 0], -k[1])


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding window 5 < the longer prompts
def test_fp8_kv_model_equals_transformers_rounding_keys_and_values(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, _ = build_family(family, tmp_path / "base")
    ours = load_model(model_dir, TorchAttention(ragged_runs.BLOCK), CPU, "float32", quantize="fp8-kv")
    assert ours.cache_geometry[3] == FP8 and ours.dtype == torch.float32
    assert all((layer.attn.k_scale, layer.attn.v_scale) == (1.0, 1.0) for layer in ours.layers)
    ref_dir = reference_checkpoint(model_dir, ours, tmp_path / "reference")
    batch = prompts(ours.config.vocab_size, LENGTHS)
    out = run_fp8(ours, batch, monkeypatch)
    ref = reference(ref_dir)
    for row, prompt in enumerate(batch):
        assert_matches(out, row, ref, prompt)
    # The rounding of keys and values is visible: the same weights with an exact cache differ.
    exact = reference(ref_dir, round_kv=False)
    with torch.no_grad():
        gap = (exact(batch[2][None]).logits[0] - out[0][2]).abs().max()
    assert gap > 1e-3, gap


def _with_scales(model_dir: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(model_dir, out)
    state = load_file(str(out / "model.safetensors"))
    save_file({**state, **tensors}, str(out / "model.safetensors"))
    return out


def test_checkpoint_kv_scales_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 0 stores k_scale and v_scale as 0-dim tensors, layer 1 one kv_scale of shape [1] for both
    (both layouts occur in FP8 exports); the reference rounds with the same scales."""
    model_dir, _ = build_family("llama", tmp_path / "base")
    scaled_dir = _with_scales(model_dir, tmp_path / "scaled", {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.0021),
        "model.layers.0.self_attn.v_scale": torch.tensor(3.0),
        "model.layers.1.self_attn.kv_scale": torch.tensor([0.0007]),
    })  # fmt: skip
    ours = load_model(scaled_dir, TorchAttention(ragged_runs.BLOCK), CPU, "float32", quantize="fp8-kv")
    scales = [(layer.attn.k_scale, layer.attn.v_scale) for layer in ours.layers]
    f32 = lambda x: torch.tensor(x).item()  # the value as stored in float32
    assert scales == [(f32(0.0021), 3.0), (f32(0.0007), f32(0.0007))]
    batch = prompts(ours.config.vocab_size, LENGTHS)
    out = run_fp8(ours, batch, monkeypatch)
    ref_dir = reference_checkpoint(scaled_dir, ours, tmp_path / "reference")
    ref = reference(ref_dir, scales)
    for row, prompt in enumerate(batch):
        assert_matches(out, row, ref, prompt)
    unscaled = run_fp8(load_model(model_dir, TorchAttention(ragged_runs.BLOCK), CPU, "float32", quantize="fp8-kv"),
                       batch, monkeypatch)  # fmt: skip
    assert (unscaled[0][2] - out[0][2]).abs().max() > 1e-3  # the scales change the rounding visibly
    # A scale the cache cannot use is refused at load, naming the tensor.
    bad_dir = _with_scales(model_dir, tmp_path / "bad", {"model.layers.1.self_attn.v_scale": torch.tensor([0.1, 0.2])})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_scale"):
        load_model(bad_dir, TorchAttention(ragged_runs.BLOCK), CPU, "float32", quantize="fp8-kv")
    # Without fp8-kv the scales are not read and the cache keeps the model's dtype.
    plain = load_model(bad_dir, TorchAttention(ragged_runs.BLOCK), CPU, "float32", quantize="fp8")
    assert plain.cache_geometry[3] == torch.float32


# ------------------------------------------------------------------------------------------- warm-up


def test_warmup_gives_a_float8_cache_four_times_the_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Same memory budget: a float8 cache has 4× the blocks of a float32 one (to the block, as the budget
    is floored), and Warmup's answer (max_batch_total_tokens) follows; the start-up line says so."""
    import lorax_server.engine as engine_module

    model_dir, _ = build_family("llama", tmp_path / "base")
    budget = types.SimpleNamespace(available=3 * 2**30 + 12345)  # a fixed machine: both runs see the same
    monkeypatch.setattr(engine_module.psutil, "virtual_memory", lambda: budget)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = {}
    for quantize in (None, "fp8-kv"):
        model = load_model(model_dir, TorchAttention(4), CPU, "float32", quantize=quantize)
        engine = Engine(model, tokenizer, CacheConfig(4, memory_fraction=1e-3))
        with caplog.at_level(logging.INFO, logger="lorax_server.engine"):
            tokens = engine.warmup(max_input_length=32, max_prefill_tokens=64, max_total_tokens=64)
        assert engine.cache.keys[0].dtype == model.cache_geometry[3]
        assert tokens == engine.blocks.num_blocks * 4
        engine.health()  # the health check's forward pass runs on (and restores) the float8 cache too
        results[quantize] = (engine.blocks.num_blocks, tokens)
    (blocks32, tokens32), (blocks8, tokens8) = results[None], results["fp8-kv"]
    assert blocks8 // 4 == blocks32 and tokens8 // 16 == tokens32 // 4  # 4× the blocks, floored once
    assert 4 * blocks32 <= blocks8 < 4 * blocks32 + 4
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:")]
    assert lines[0].startswith(f"KV cache: float32, {blocks32} blocks of 4 tokens = {tokens32} tokens")
    assert lines[1].startswith(f"KV cache: float8_e4m3fn, {blocks8} blocks of 4 tokens = {tokens8} tokens")
    print(f"blocks float32 {blocks32} → float8 {blocks8} ({blocks8 / blocks32:.3f}×), tokens {tokens32} → {tokens8}")
