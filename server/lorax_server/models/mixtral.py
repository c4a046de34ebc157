"""Mixtral: the Mistral layout with a sparse top-2 mixture of SwiGLU experts instead of the MLP.
Adapters may target attention; LoRA on experts is not supported yet (refused, never dropped)."""

from .spec import ArchSpec

MIXTRAL = ArchSpec(
    family="mixtral",
    moe_gate="block_sparse_moe.gate",
    adaptable_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
)

ARCHITECTURES = {"MixtralForCausalLM": MIXTRAL}
