"""Mixtral: the Mistral layout with a sparse top-2 mixture of SwiGLU experts instead of the MLP.
Adapters may target attention and each expert's w1 (gate), w3 (up) and w2 (down), in the per-expert
layout hub adapters use (`block_sparse_moe.experts.{e}.w1`); the router (`gate`) cannot be adapted."""

from .spec import ArchSpec

MIXTRAL = ArchSpec(
    family="mixtral",
    moe_gate="block_sparse_moe.gate",
    adaptable_modules=("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"),
)

ARCHITECTURES = {"MixtralForCausalLM": MIXTRAL}
