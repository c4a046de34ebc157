"""The documentation site builds with `mkdocs build --strict` (no broken link, no page left out of the
nav), its generated OpenAPI page covers the router's document, and the pages say what the code does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from openapi_markdown import render  # noqa: E402

MKDOCS = REPO / ".venv" / "bin" / "mkdocs"
OPENAPI = json.loads((REPO / "docs" / "reference" / "openapi.json").read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's notice about its future
    )  # fmt: skip
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def test_every_operation_has_a_section_on_the_openapi_page(site: Path) -> None:
    page = (site / "reference" / "openapi.html").read_text()  # the offline plugin: no directory URLs
    for path, item in OPENAPI["paths"].items():
        for method in item:
            assert f"{method.upper()} {path}</code>" in page, (method, path)
    for name in OPENAPI.get("components", {}).get("schemas", {}):
        assert f"<code>{name}</code>" in page, name


def test_local_images_and_links_of_every_page_resolve(site: Path) -> None:
    checked = 0
    for html in site.rglob("*.html"):
        if html.name == "404.html":
            continue  # served for any missing URL, so its links are site-absolute
        for target in re.findall(r'(?:src|href)="([^"#?]+)', html.read_text()):
            if re.match(r"^[a-z]+:|^//", target):
                continue  # external
            if target.endswith((".png", ".html", ".json")):
                assert (html.parent / target).resolve().is_file(), f"{html.relative_to(site)} → {target}"
                checked += 1
    assert checked > 0


def test_benchmark_plots_from_bench_are_published(site: Path) -> None:
    page = (site / "benchmarks.html").read_text()
    plots = sorted(p.name for p in (REPO / "bench").glob("*.png"))
    assert plots
    for plot in plots:
        assert (site / "bench" / plot).is_file()
        assert f'src="bench/{plot}"' in page, plot


def test_the_metrics_page_lists_every_metric_the_router_records() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "router" / "src").rglob("*.rs"))
    recorded = set(re.findall(r'"(lorax_[a-z_]+)"', source))
    page = (REPO / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(lorax_[a-z_]+)`", page, flags=re.MULTILINE))
    assert recorded and recorded == documented


def test_the_renderer_reads_both_openapi_30_and_31_forms() -> None:
    document = {
        "openapi": "3.0.3",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/x": {
                "post": {
                    "summary": "Make an x",
                    "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/X"}}}},
                    "responses": {"200": {"description": "ok | done"}},
                }
            }
        },
        "components": {
            "schemas": {
                "X": {
                    "type": "object",
                    "required": ["a"],
                    "properties": {
                        "a": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "nullable": True},
                        "b": {"type": ["integer", "null"], "exclusiveMinimum": 0, "description": "a b"},
                        "c": {"type": "array", "items": {"$ref": "#/components/schemas/Y"}},
                    },
                },
                "Y": {"type": "string", "enum": ["p", "q"]},
                "Z": {"allOf": [{"$ref": "#/components/schemas/X"}, {"properties": {"d": {"type": "string"}}}]},
            }
        },
    }
    page = render(document)
    assert "| `a` | number or null | yes | minimum: `0`; minimum excluded |" in page
    assert "| `b` | integer or null |  | a b greater than: `0` |" in page
    assert "| `c` | array of [`Y`](#schema-y) |" in page
    assert "Request body: `application/json` [`X`](#schema-x)" in page
    assert "| 200 | ok \\| done | none |" in page
    assert 'Type: `"p"` or `"q"`.' in page
    assert "Also has every field of [`X`](#schema-x).\n\n| field | type | required | description |\n" in page
    assert "| `d` | string |  |  |" in page
