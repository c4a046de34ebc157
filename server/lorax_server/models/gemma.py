"""Gemma: Llama layout with GeGLU-tanh, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), tied head.
Gemma2 adds sandwich norms around attention and MLP, attention/final logit soft-capping, a custom
attention scale and alternating sliding/global layers (those three come from its config)."""

from .spec import ArchSpec

GEMMA = ArchSpec(family="gemma", norm_weight_offset=1.0, embed_scale=True)
GEMMA2 = ArchSpec(family="gemma2", norm_weight_offset=1.0, embed_scale=True, sandwich_norms=True)

ARCHITECTURES = {"GemmaForCausalLM": GEMMA, "Gemma2ForCausalLM": GEMMA2}
