"""DBRX: pre-norm blocks with bias-free LayerNorms, fused q|k|v (`Wqkv`, clamped to ±clip_qkv) and a
sparse MoE whose experts are stored stacked (`ffn.experts.mlp.{w1,v1,w2}`). Routing softmax in float32,
top-k, weights divided by their `moe_normalize_expert_weights`-norm. Adapters may target attention;
the stacked experts cannot be adapted (such adapters are refused)."""

from .spec import ArchSpec

DBRX = ArchSpec(
    family="dbrx",
    embed="transformer.wte",
    layer="transformer.blocks.{i}",
    final_norm="transformer.norm_f",
    input_norm="norm_attn_norm.norm_1",
    post_attention_norm="norm_attn_norm.norm_2",
    norm="layer_nobias",
    fused_qkv="norm_attn_norm.attn.Wqkv",
    qkv_bias=False,
    o_proj="norm_attn_norm.attn.out_proj",
    moe_gate="ffn.router.layer",
    moe_stacked="ffn.experts.mlp",
    adaptable_modules=("Wqkv", "out_proj"),
)

ARCHITECTURES = {"DbrxForCausalLM": DBRX}
