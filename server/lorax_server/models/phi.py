"""Phi-2 (`phi`): attention and a plain GELU MLP in parallel off one LayerNorm, partial rotary,
biases everywhere (including the LM head), `dense` output projection, `fc1`/`fc2` MLP."""

from .spec import ArchSpec

PHI = ArchSpec(
    family="phi",
    norm="layer",
    parallel_residual=True,
    qkv_bias=True,
    o_proj="self_attn.dense",
    o_bias=True,
    mlp="plain",
    up_proj="mlp.fc1",
    down_proj="mlp.fc2",
    mlp_bias=True,
    final_norm="model.final_layernorm",
    lm_head_bias=True,
    adaptable_modules=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
)

ARCHITECTURES = {"PhiForCausalLM": PHI}
