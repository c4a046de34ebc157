"""Phi-3: the Llama layout with q|k|v and gate|up stored fused (`qkv_proj`, `gate_up_proj`); adapters
target the fused modules. Longrope ("su") scaling comes from its config when present."""

from .spec import ArchSpec

PHI3 = ArchSpec(
    family="phi3",
    fused_qkv="self_attn.qkv_proj",
    fused_gate_up="mlp.gate_up_proj",
    adaptable_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
)

ARCHITECTURES = {"Phi3ForCausalLM": PHI3}
