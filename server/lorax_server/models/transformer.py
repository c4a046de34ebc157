"""The shared decoder-only transformer every spec is built from: embedding → layers → norm → head.

Works on ragged batches laid end to end (`ForwardBatch`): linear layers see `[num_tokens, hidden]`
with no padding; only attention knows about sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..forward import ForwardBatch
from ..kv_cache import FP8_KV, KVCache
from ..layers.activations import activation
from ..layers.attention import AttentionBackend, alibi_slopes
from ..layers.linear import Linear
from ..layers.moe import SparseMoE
from ..layers.norm import HeadLayerNorm, LayerNorm, RMSNorm
from ..layers.parallel import LinearShard
from ..layers.rotary import RotaryEmbedding, apply_rotary
from ..utils.weights import Weights
from .config import ModelConfig
from .spec import ArchSpec


def _norm(spec: ArchSpec, cfg: ModelConfig, weights: Weights, prefix: str):  # noqa: ANN202
    if spec.norm in ("layer", "layer_nobias"):
        return LayerNorm.load(weights, prefix, cfg.norm_eps, cfg.hidden_size, bias=spec.norm == "layer")
    return RMSNorm.load(weights, prefix, cfg.norm_eps, cfg.hidden_size, spec.norm_weight_offset)


class SelfAttention:
    def __init__(self, spec: ArchSpec, cfg: ModelConfig, weights: Weights, prefix: str, layer_idx: int) -> None:
        h, d, kvh = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
        tp = weights.tp
        h0, hl = tp.split(h, "the number of attention heads")  # this rank's query heads
        kv0, kvl = tp.kv_heads(kvh, h)  # ... and the key/value heads they read
        bias = cfg.attention_bias if spec.qkv_bias is None else spec.qkv_bias
        q_size, kv_size = h * d, kvh * d
        q_rows, kv_rows = (h0 * d, hl * d), (kv0 * d, kvl * d)
        local = [hl * d, kvl * d, kvl * d]
        if spec.fused_qkv:
            if spec.qkv_per_head:  # rows [heads, 3, head_dim]: a rank's heads are one range
                fused_rows = ((h0 * 3 * d, hl * 3 * d),)
            else:
                fused_rows = (q_rows, (q_size + kv_rows[0], kv_rows[1]), (q_size + kv_size + kv_rows[0], kv_rows[1]))
            self.qkv = Linear.load(
                weights,
                [f"{prefix}.{spec.fused_qkv}"],
                bias=bias,
                shapes=[(q_size + 2 * kv_size, cfg.hidden_size)],
                transposed=spec.conv1d_weights,
                out_splits=local,
                rows=[fused_rows] if tp.sharded else None,
            )
        else:
            self.qkv = Linear.load(
                weights,
                [f"{prefix}.{spec.q_proj}", f"{prefix}.{spec.k_proj}", f"{prefix}.{spec.v_proj}"],
                bias=bias,
                shapes=[(q_size, cfg.hidden_size), (kv_size, cfg.hidden_size), (kv_size, cfg.hidden_size)],
                rows=[(q_rows,), (kv_rows,), (kv_rows,)] if tp.sharded else None,
            )
        self.o = Linear.load(
            weights,
            [f"{prefix}.{spec.o_proj}"],
            bias=spec.o_bias,
            shapes=[(cfg.hidden_size, h * d)],
            transposed=spec.conv1d_weights,
            cols=q_rows if tp.sharded else None,
        )
        self.num_heads, self.num_kv_heads, self.head_dim = hl, kvl, d
        self.qkv_per_head = spec.qkv_per_head
        self.scale = (cfg.query_pre_attn_scalar or d) ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.rotary = spec.position_encoding == "rope"
        self.alibi = None
        if spec.position_encoding == "alibi":  # slopes follow the head: a rank takes its heads' slopes
            self.alibi = alibi_slopes(h, weights.device)[h0 : h0 + hl].contiguous()
        self.softcap = cfg.attn_logit_softcap
        self.clip_qkv = cfg.clip_qkv
        self.interleaved = spec.rope_interleaved
        self.q_norm = self.k_norm = None
        if cfg.use_qk_norm:
            q_norm, k_norm = f"{prefix}.{spec.q_norm}.weight", f"{prefix}.{spec.k_norm}.weight"
            self.q_norm = HeadLayerNorm(weights.get_ranges(q_norm, 0, ((h0, hl),), (h, d)), cfg.norm_eps)
            self.k_norm = HeadLayerNorm(weights.get_ranges(k_norm, 0, ((kv0, kvl),), (kvh, d)), cfg.norm_eps)
        self.window = cfg.window_for(layer_idx) if spec.uses_sliding_window else None
        self.layer_idx = layer_idx
        # Per-layer scales of a float8 KV cache (`CausalLM` reads them from the checkpoint for `fp8-kv`);
        # caches in the model's dtype ignore them.
        self.k_scale = self.v_scale = 1.0

    def __call__(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        meta: ForwardBatch,
        cos: torch.Tensor,  # [num_tokens, rot_dim]
        sin: torch.Tensor,  # [num_tokens, rot_dim]
        cache: KVCache,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        qkv = self.qkv(x, meta)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        if self.qkv_per_head:  # rows [heads, 3, head_dim]: the checkpoint's layout, which adapters share
            q, k, v = qkv.view(-1, self.num_heads, 3, self.head_dim).unbind(2)
        else:
            q, k, v = qkv.split(self.qkv.out_splits, dim=-1)
        q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q = apply_rotary(q, cos, sin, self.interleaved)
            k = apply_rotary(k, cos, sin, self.interleaved)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        cache.write(self.layer_idx, meta.slots, k, v, self.k_scale, self.v_scale)
        out = backend.attend(
            q,
            cache.keys[self.layer_idx],
            cache.values[self.layer_idx],
            meta,
            self.scale,
            self.window,
            self.softcap,
            alibi_slopes=self.alibi,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return self.o(out.reshape(-1, self.num_heads * self.head_dim), meta)

    def linears(self) -> list[Linear]:
        return [self.qkv, self.o]


class GatedMLP:
    """down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, spec: ArchSpec, cfg: ModelConfig, weights: Weights, prefix: str) -> None:
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        sharded = weights.tp.sharded
        i0, il = weights.tp.split(inter, "intermediate_size")
        if spec.fused_gate_up:
            self.gate_up = Linear.load(
                weights,
                [f"{prefix}.{spec.fused_gate_up}"],
                bias=cfg.mlp_bias,
                shapes=[(2 * inter, hidden)],
                out_splits=[il, il],
                rows=[((i0, il), (inter + i0, il))] if sharded else None,
            )
        else:
            self.gate_up = Linear.load(
                weights,
                [f"{prefix}.{spec.gate_proj}", f"{prefix}.{spec.up_proj}"],
                bias=cfg.mlp_bias,
                shapes=[(inter, hidden), (inter, hidden)],
                rows=[((i0, il),)] * 2 if sharded else None,
            )
        self.down = Linear.load(
            weights,
            [f"{prefix}.{spec.down_proj}"],
            bias=cfg.mlp_bias,
            shapes=[(hidden, inter)],
            cols=(i0, il) if sharded else None,
        )
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: torch.Tensor, meta: ForwardBatch) -> torch.Tensor:
        gate, up = self.gate_up(x, meta).split(self.gate_up.out_splits, dim=-1)
        return self.down(self.act(gate) * up, meta)

    def linears(self) -> list[Linear]:
        return [self.gate_up, self.down]


def _moe(spec: ArchSpec, cfg: ModelConfig, weights: Weights, prefix: str) -> SparseMoE:
    hidden, inter, experts = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    tp = weights.tp
    i0, il = tp.split(inter, "intermediate_size")  # every rank holds a slice of every expert
    # The router stays dense (small, and its top-k choice is sensitive); the experts are quantized.
    gate = Linear.load(weights, [f"{prefix}.{spec.moe_gate}"], bias=False, shapes=[(experts, hidden)], quantize=False)
    if spec.moe_stacked:  # DBRX: one tensor per projection; views per expert, quantized one by one
        per_expert = tuple((e * inter + i0, il) for e in range(experts))

        def get(name: str) -> torch.Tensor:  # [experts, rank's inter, hidden]
            full = f"{prefix}.{spec.moe_stacked}.{name}"
            return weights.get_ranges(full, 0, per_expert, (experts * inter, hidden)).view(-1, il, hidden)

        gate_up_all = torch.cat([get("w1"), get("v1")], dim=1)  # [experts, 2 * inter, hidden]
        down_all = get("w2").transpose(1, 2)  # [experts, hidden, inter]
        gate_up = [Linear(gate_up_all[e], None, [il, il]) for e in range(experts)]
        down = [Linear(down_all[e], None, [hidden]) for e in range(experts)]
        for linear in [*gate_up, *down]:
            linear.quantize(weights.quantizer)
    else:
        expert = [f"{prefix}.{spec.moe_expert.format(e=e)}" for e in range(experts)]
        names = [(f"{p}.w1", f"{p}.w3", f"{p}.w2") for p in expert]  # gate, up, down: what adapters target
        rows, cols = ([((i0, il),)] * 2, (i0, il)) if tp.sharded else (None, None)
        gate_up = [
            Linear.load(weights, [w1, w3], bias=False, shapes=[(inter, hidden)] * 2, rows=rows) for w1, w3, _ in names
        ]
        # The experts' partial outputs are summed over the ranks once, by the MoE layer.
        down = [
            Linear.load(weights, [w2], bias=False, shapes=[(hidden, inter)], cols=cols, reduce=False)
            for _, _, w2 in names
        ]
    act = activation(cfg.hidden_act)
    return SparseMoE(gate, gate_up, down, cfg.experts_per_token, act, cfg.moe_norm_p, tp)


class PlainMLP:
    """down(act(up(x))) with biases: Phi-2, GPT-2, Bloom."""

    def __init__(self, spec: ArchSpec, cfg: ModelConfig, weights: Weights, prefix: str) -> None:
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        bias = cfg.mlp_bias if spec.mlp_bias is None else spec.mlp_bias
        conv1d = spec.conv1d_weights
        sharded = weights.tp.sharded
        i0, il = weights.tp.split(inter, "intermediate_size")
        self.up = Linear.load(
            weights,
            [f"{prefix}.{spec.up_proj}"],
            bias=bias,
            shapes=[(inter, hidden)],
            transposed=conv1d,
            rows=[((i0, il),)] if sharded else None,
        )
        self.down = Linear.load(
            weights,
            [f"{prefix}.{spec.down_proj}"],
            bias=bias,
            shapes=[(hidden, inter)],
            transposed=conv1d,
            cols=(i0, il) if sharded else None,
        )
        self.act = activation(spec.hidden_act or cfg.hidden_act)

    def __call__(self, x: torch.Tensor, meta: ForwardBatch) -> torch.Tensor:
        return self.down(self.act(self.up(x, meta)), meta)

    def linears(self) -> list[Linear]:
        return [self.up, self.down]


def _mlp(spec: ArchSpec, cfg: ModelConfig, weights: Weights, prefix: str):  # noqa: ANN202
    if spec.moe_gate:
        return _moe(spec, cfg, weights, prefix)
    return PlainMLP(spec, cfg, weights, prefix) if spec.mlp == "plain" else GatedMLP(spec, cfg, weights, prefix)


class DecoderLayer:
    def __init__(self, spec: ArchSpec, cfg: ModelConfig, weights: Weights, layer_idx: int) -> None:
        prefix = spec.layer.format(i=layer_idx)
        self.input_norm = _norm(spec, cfg, weights, f"{prefix}.{spec.input_norm}")
        self.attn = SelfAttention(spec, cfg, weights, prefix, layer_idx)
        self.parallel = spec.parallel_residual
        if not self.parallel:
            self.post_attention_norm = _norm(spec, cfg, weights, f"{prefix}.{spec.post_attention_norm}")
        self.mlp = _mlp(spec, cfg, weights, prefix)
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_norm = _norm(spec, cfg, weights, f"{prefix}.{spec.pre_feedforward_norm}")
            self.post_feedforward_norm = _norm(spec, cfg, weights, f"{prefix}.{spec.post_feedforward_norm}")
        self.residual_post_norm = cfg.residual_post_norm  # Bloom: the residual is the normed input
        if self.residual_post_norm and (self.parallel or self.sandwich):
            raise ValueError(f"{spec.family}: apply_residual_connection_post_layernorm is not supported")

    def __call__(self, x: torch.Tensor, meta: ForwardBatch, cos, sin, cache: KVCache, backend) -> torch.Tensor:  # noqa: ANN001
        normed = self.input_norm(x)
        attn = self.attn(normed, meta, cos, sin, cache, backend)
        if self.parallel:
            return x + attn + self.mlp(normed, meta)
        if not self.sandwich:
            x = (normed if self.residual_post_norm else x) + attn
            normed = self.post_attention_norm(x)
            return (normed if self.residual_post_norm else x) + self.mlp(normed, meta)
        x = x + self.post_attention_norm(attn)
        return x + self.post_feedforward_norm(self.mlp(self.pre_feedforward_norm(x), meta))

    def linears(self) -> list[Linear]:
        return self.attn.linears() + self.mlp.linears()


def _kv_scales(spec: ArchSpec, weights: Weights, layer_prefix: str) -> tuple[float, float]:
    """A layer's float8 KV cache scales as FP8 checkpoints store them beside the projections
    (`<attention module>.k_scale` / `.v_scale`, or one `.kv_scale` for both); 1.0 where absent, as vLLM."""
    module = (spec.fused_qkv or spec.q_proj).rpartition(".")[0]
    prefix = f"{layer_prefix}.{module}" if module else layer_prefix
    scales = []
    for kind in ("k_scale", "v_scale"):
        name = next((n for n in (f"{prefix}.{kind}", f"{prefix}.kv_scale") if weights.has(n)), None)
        if name is None:
            scales.append(1.0)
            continue
        value = weights.get_stored(name).float()  # as stored: not rounded to a half-precision model dtype
        if value.numel() != 1 or not (math.isfinite(value.item()) and value.item() > 0):
            raise ValueError(f"{name}: a float8 KV cache needs one positive scale per layer, got {value.tolist()}")
        scales.append(value.item())
    return scales[0], scales[1]


class CausalLM:
    """A loaded model: call `forward` with a batch's metadata to get logits of `meta.logits_index` tokens."""

    def __init__(
        self,
        spec: ArchSpec,
        cfg: ModelConfig,
        weights: Weights,
        backend: AttentionBackend,
        device: torch.device,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        """`kv_cache_dtype`: None keeps the KV cache in the model's dtype; float8_e4m3fn (`--quantize
        fp8-kv`) stores it scaled, with each layer's k/v scales from the checkpoint (1.0 without)."""
        self.spec, self.config, self.backend, self.device = spec, cfg, backend, device
        self.dtype = weights.dtype
        if kv_cache_dtype not in (None, weights.dtype, FP8_KV):
            raise ValueError(f"unsupported KV cache dtype {kv_cache_dtype}: the model's dtype or {FP8_KV}")
        self.kv_cache_dtype = kv_cache_dtype or weights.dtype
        self.tp = weights.tp
        # Vocab-parallel: a rank holds the embedding rows (and LM head rows) of its block of the vocabulary.
        self.vocab_rows = self.tp.vocab(cfg.vocab_size)
        embed_name, embed_shape = f"{spec.embed}.weight", (cfg.vocab_size, cfg.hidden_size)
        self.embed = weights.get_ranges(embed_name, 0, (self.vocab_rows,), embed_shape)
        self.embed_norm = _norm(spec, cfg, weights, spec.embed_norm) if spec.embed_norm else None
        self.position_embed = None  # [max_positions, hidden]: learned absolute positions
        if spec.position_encoding == "learned":
            shape = (cfg.max_position_embeddings, cfg.hidden_size)
            self.position_embed = weights.get(f"{spec.position_embed}.weight", shape)
        self.layers = [DecoderLayer(spec, cfg, weights, i) for i in range(cfg.num_layers)]
        if self.kv_cache_dtype == FP8_KV:
            for i, layer in enumerate(self.layers):
                layer.attn.k_scale, layer.attn.v_scale = _kv_scales(spec, weights, spec.layer.format(i=i))
        self.norm = _norm(spec, cfg, weights, spec.final_norm)
        if cfg.tie_word_embeddings or not weights.has(f"{spec.lm_head}.weight"):
            self.lm_head = Linear(self.embed, None, [self.vocab_rows[1]])
            if self.tp.sharded:
                self.lm_head.shard = LinearShard(cfg.hidden_size, (cfg.vocab_size,), ((self.vocab_rows,),))
        else:
            self.lm_head = Linear.load(
                weights,
                [spec.lm_head],
                bias=spec.lm_head_bias,
                shapes=[(cfg.vocab_size, cfg.hidden_size)],
                quantize=False,
                rows=[(self.vocab_rows,)] if self.tp.sharded else None,
            )
        self.rotary = RotaryEmbedding(
            cfg.rope, cfg.head_dim, cfg.max_position_embeddings, device, interleaved=spec.rope_interleaved
        )

    supports_adapters = True

    def linears(self) -> list[Linear]:
        """Every linear of the model, in layer order, the LM head last."""
        return [linear for layer in self.layers for linear in layer.linears()] + [self.lm_head]

    def adaptable_linears(self) -> dict[str, tuple[Linear, int]]:
        """Checkpoint module name → (linear, fused part) for every module the spec lets adapters
        target (by the short name adapters use, e.g. `q_proj`), in layer order."""
        adaptable = set(self.spec.adaptable_modules)
        return {
            name: (linear, part)
            for linear in self.linears()
            for part, name in enumerate(linear.part_names)
            if name.rsplit(".", 1)[-1] in adaptable
        }

    @property
    def recompute_at_length(self) -> int | None:
        """A sequence reaching this length during decode must re-run all its tokens (longrope switches
        to its long factors there, as transformers does by dropping its cache); None: never."""
        return self.rotary.recompute_at_length

    @property
    def length_dependent_above(self) -> int | None:
        """Prompts longer than this have keys that depend on the prompt's whole length (see
        `RotaryEmbedding.length_dependent_above`); None: never."""
        return self.rotary.length_dependent_above

    @property
    def position_limit(self) -> int | None:
        """The longest sequence this model can run, when that is a hard limit; None: no hard limit."""
        if self.spec.position_encoding == "learned" or self.spec.hard_context_limit:
            return self.config.max_position_embeddings
        return None

    @property
    def cache_geometry(self) -> tuple[int, int, int, torch.dtype]:
        """(layers, kv_heads, head_dim, dtype) of the paged KV cache this model writes."""
        attn = self.layers[0].attn  # this rank's kv heads
        return self.config.num_layers, attn.num_kv_heads, attn.head_dim, self.kv_cache_dtype

    @torch.inference_mode()
    def forward(self, meta: ForwardBatch, cache: KVCache, hidden: bool = False):  # noqa: ANN201
        """Returns float32 logits [num_logits, vocab] for the tokens in `meta.logits_index`; with
        `hidden`, also their final hidden states (after the last norm) [num_logits, hidden_size]."""
        x = self._embed(meta.input_ids)  # [num_tokens, hidden]
        if self.spec.embed_scale:
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.position_embed is not None:
            if meta.max_context_len > self.position_embed.shape[0]:
                raise ValueError(
                    f"sequence of {meta.max_context_len} tokens is longer than the model's "
                    f"{self.position_embed.shape[0]} learned positions; lower --max-total-tokens"
                )
            x = x + F.embedding(meta.positions, self.position_embed)
        cos = sin = None  # [num_tokens, rot_dim] each, rotary models only
        if self.spec.position_encoding == "rope":
            cos, sin = self.rotary.cos_sin(meta.positions, meta.seq_lens)
        for layer in self.layers:
            x = layer(x, meta, cos, sin, cache, self.backend)
        h = self.norm(x[meta.logits_index])
        logits = self.logits_of(h)
        return (logits, h) if hidden else logits

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, vocab] of final hidden states h [n, hidden_size]."""
        logits = self.lm_head(h).float()
        logits = self.tp.all_gather_columns(logits, self.config.vocab_size)  # every rank's vocabulary block
        if self.config.logit_scale is not None:
            logits = logits * self.config.logit_scale
        if self.config.final_logit_softcap:
            cap = self.config.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.sharded:
            return F.embedding(ids, self.embed)
        start, size = self.vocab_rows
        local = ids - start
        outside = (local < 0) | (local >= size)  # another rank's tokens: zeros here, its rows there
        x = F.embedding(local.masked_fill(outside, 0), self.embed)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))
