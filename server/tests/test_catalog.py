"""docs/models/base_models.md lists exactly what the registry serves."""

from pathlib import Path

from lorax_server.models.catalog import FAMILY_NOTES, render
from lorax_server.models.registry import REGISTRY

PAGE = Path(__file__).resolve().parents[2] / "docs" / "models" / "base_models.md"


def test_page_is_generated_from_the_registry() -> None:
    assert PAGE.read_text() == render(), "run: python -m lorax_server.models.catalog > docs/models/base_models.md"


def test_every_family_is_described() -> None:
    assert {spec.family for spec in REGISTRY.values()} <= set(FAMILY_NOTES)
