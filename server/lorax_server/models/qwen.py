"""Qwen (v1, `QWenLMHeadModel`, remote code): the Llama block under GPT-style names — q|k|v fused in
`attn.c_attn` (with bias), `attn.c_proj` out, and an MLP `c_proj(w1(x) * silu(w2(x)))`, so w2 is the
gated projection. Its config vocabulary is read in `config.py`: the context is capped at `seq_length`,
below which Qwen's dynamic NTK and logn attention never act."""

from .spec import ArchSpec

QWEN = ArchSpec(
    family="qwen",
    embed="transformer.wte",
    layer="transformer.h.{i}",
    final_norm="transformer.ln_f",
    input_norm="ln_1",
    post_attention_norm="ln_2",
    fused_qkv="attn.c_attn",
    qkv_bias=True,
    o_proj="attn.c_proj",
    gate_proj="mlp.w2",
    up_proj="mlp.w1",
    down_proj="mlp.c_proj",
    hard_context_limit=True,
    adaptable_modules=("c_attn", "c_proj", "w1", "w2"),
)

ARCHITECTURES = {"QWenLMHeadModel": QWEN}
