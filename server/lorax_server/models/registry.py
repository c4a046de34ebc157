"""`architectures[0]` of config.json → the spec that builds it."""

from __future__ import annotations

from . import gemma, llama, qwen2
from .spec import ArchSpec

REGISTRY: dict[str, ArchSpec] = {**llama.ARCHITECTURES, **qwen2.ARCHITECTURES, **gemma.ARCHITECTURES}


class UnsupportedArchitecture(ValueError):
    pass


def spec_for(architecture: str) -> ArchSpec:
    if architecture not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise UnsupportedArchitecture(f"architecture {architecture!r} is not supported (supported: {known})")
    return REGISTRY[architecture]
