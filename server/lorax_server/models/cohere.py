"""Command-R (cohere): bias-free LayerNorm, attention and MLP in parallel off one norm, interleaved
rotary pairs, tied embeddings, logits scaled by `logit_scale`, optional per-head q/k LayerNorm."""

from .spec import ArchSpec

COHERE = ArchSpec(family="cohere", norm="layer_nobias", parallel_residual=True, rope_interleaved=True)

ARCHITECTURES = {"CohereForCausalLM": COHERE}
