"""What an architecture family states about itself. Everything not stated here is shared."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """Weight names (relative to the checkpoint root, `{i}` = layer index) and structural switches."""

    family: str
    embed: str = "model.embed_tokens"
    layer: str = "model.layers.{i}"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Inside a layer:
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    fused_qkv: str | None = None  # checkpoint stores q|k|v as one module (e.g. Phi-3 "self_attn.qkv_proj")
    fused_gate_up: str | None = None  # checkpoint stores gate|up as one module (e.g. "mlp.gate_up_proj")
    # Sparse MoE MLP (Mixtral): router and per-expert w1 (gate), w3 (up), w2 (down) weights.
    moe_gate: str | None = None  # e.g. "block_sparse_moe.gate"; None: dense MLP
    moe_expert: str = "block_sparse_moe.experts.{e}"
    # DBRX: every expert of a projection in one [experts * intermediate, hidden] tensor under this prefix
    # (w1 gate, v1 up, w2 down stored transposed); such experts cannot be adapted.
    moe_stacked: str | None = None
    mlp: str = "gated"  # gated: down(act(gate) * up) | plain: down(act(up)) (up_proj/down_proj names used)
    o_bias: bool = False
    mlp_bias: bool | None = None  # None: config.mlp_bias decides
    lm_head_bias: bool = False
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    pre_feedforward_norm: str = "pre_feedforward_layernorm"  # sandwich_norms only
    post_feedforward_norm: str = "post_feedforward_layernorm"  # sandwich_norms only
    norm: str = "rms"  # rms | layer | layer_nobias
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm(x)), one norm per layer
    rope_interleaved: bool = False  # rotate pairs (x0, x1), (x2, x3)... instead of halves
    q_norm: str = "self_attn.q_norm"  # per-head q/k norms, used when config.use_qk_norm
    k_norm: str = "self_attn.k_norm"
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    embed_scale: bool = False  # Gemma scales embeddings by sqrt(hidden)
    # Gemma2: post_attention_norm normalises the attention output; pre/post norms wrap the MLP.
    sandwich_norms: bool = False
    qkv_bias: bool | None = None  # None: config.attention_bias decides
    uses_sliding_window: bool = True  # honour config.sliding_window
    # Positions: rope (rotary q/k) | alibi (per-head linear attention biases, Bloom) | learned (the
    # `position_embed` table added to the token embeddings, GPT-2).
    position_encoding: str = "rope"
    position_embed: str = "transformer.wpe"  # learned positions only
    embed_norm: str | None = None  # a LayerNorm right after the token embedding (Bloom)
    qkv_per_head: bool = False  # fused qkv rows laid out [heads, 3, head_dim] (Bloom), not [q | k | v]
    conv1d_weights: bool = False  # linear weights stored [in, out] (GPT-2's Conv1D)
    hidden_act: str | None = None  # the architecture's fixed activation; None: config.json's
    optional_prefix: str = ""  # checkpoints saved from the bare base model omit it (GPT-2 "h.0...")
    # max_position_embeddings cannot be exceeded (implied by learned positions; Qwen v1's seq_length).
    hard_context_limit: bool = False
    # Modules a LoRA adapter may target, by the name adapters use.
    adaptable_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
