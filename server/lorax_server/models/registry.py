"""`architectures[0]` of config.json → the spec that builds it."""

from __future__ import annotations

from . import bloom, cohere, dbrx, gemma, gpt2, llama, mixtral, phi, phi3, qwen, qwen2
from .spec import ArchSpec

FAMILIES = (llama, qwen2, gemma, phi3, phi, cohere, mixtral, gpt2, bloom, qwen, dbrx)
REGISTRY: dict[str, ArchSpec] = {name: spec for family in FAMILIES for name, spec in family.ARCHITECTURES.items()}
