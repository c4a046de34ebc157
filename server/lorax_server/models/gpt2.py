"""GPT-2: learned absolute positions (`wpe`), LayerNorm, a plain GELU MLP, biases everywhere, and
Conv1D linears stored [in, out] with q|k|v fused in `c_attn`; tied LM head. Adapters (peft's
`fan_in_fan_out`) target c_attn as one module, both c_proj's and c_fc."""

from .spec import ArchSpec

GPT2 = ArchSpec(
    family="gpt2",
    embed="transformer.wte",
    layer="transformer.h.{i}",
    final_norm="transformer.ln_f",
    position_encoding="learned",
    position_embed="transformer.wpe",
    conv1d_weights=True,
    fused_qkv="attn.c_attn",
    qkv_bias=True,
    o_proj="attn.c_proj",
    o_bias=True,
    mlp="plain",
    up_proj="mlp.c_fc",
    down_proj="mlp.c_proj",
    mlp_bias=True,
    input_norm="ln_1",
    post_attention_norm="ln_2",
    norm="layer",
    uses_sliding_window=False,
    optional_prefix="transformer.",
    adaptable_modules=("c_attn", "c_proj", "c_fc"),
)

ARCHITECTURES = {"GPT2LMHeadModel": GPT2}
