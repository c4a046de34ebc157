"""Bloom: ALiBi instead of rotary, a LayerNorm on the word embeddings, q/k/v fused and interleaved per
head (rows [heads, 3, head_dim], kept as stored so adapters line up), a plain tanh-GELU MLP, biases
everywhere, tied LM head."""

from .spec import ArchSpec

BLOOM = ArchSpec(
    family="bloom",
    embed="transformer.word_embeddings",
    embed_norm="transformer.word_embeddings_layernorm",
    layer="transformer.h.{i}",
    final_norm="transformer.ln_f",
    position_encoding="alibi",
    fused_qkv="self_attention.query_key_value",
    qkv_per_head=True,
    qkv_bias=True,
    o_proj="self_attention.dense",
    o_bias=True,
    mlp="plain",
    up_proj="mlp.dense_h_to_4h",
    down_proj="mlp.dense_4h_to_h",
    mlp_bias=True,
    hidden_act="gelu_pytorch_tanh",  # bloom_gelu_forward: the tanh approximation
    norm="layer",
    uses_sliding_window=False,
    optional_prefix="transformer.",
    adaptable_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
)

ARCHITECTURES = {"BloomForCausalLM": BLOOM}
