"""mkdocs hooks for the documentation site (mkdocs.yml).

- The "OpenAPI schema" page is rendered from `docs/reference/openapi.json` at build time.
- Some pages live next to what they describe, outside `docs/`: benchmark results beside the scripts
  that make them (`bench/`), the Helm chart's values reference beside the chart. Pages link them with
  repository-relative paths (`../bench/x.png`), which work when the Markdown is read on a code host;
  the site publishes those files at the same paths and points the links there.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page
from openapi_markdown import render

REPO = Path(__file__).resolve().parent.parent
OPENAPI_JSON = "reference/openapi.json"
OPENAPI_PAGE = "reference/openapi.md"
# Repository files outside docs/ that the site publishes, at the same path.
PUBLISHED_GLOBS = ("bench/RESULTS*.md", "bench/*.png", "charts/lorax/README.md", "charts/lorax/examples/*.yaml")

LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def published() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for g in PUBLISHED_GLOBS for p in REPO.glob(g))


def on_files(files: Files, config: MkDocsConfig) -> Files:
    document = Path(config.docs_dir) / OPENAPI_JSON
    files.append(File.generated(config, OPENAPI_PAGE, content=render(json.loads(document.read_text()))))
    for path in published():
        files.append(File.generated(config, path, abs_src_path=str(REPO / path)))
    return files


def site_path(repo_path: str) -> str | None:
    """Where a repository file is in the site's source tree, or None when the site lacks it."""
    if repo_path.startswith("docs/"):
        return repo_path.removeprefix("docs/")
    return repo_path if repo_path in published() else None


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    source = page.file.src_uri
    # Where the page's Markdown sits in the repository: in docs/, or published from elsewhere.
    repo_dir = posixpath.dirname(source if source in published() else "docs/" + source)

    def relink(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^[#/]", target):
            return match.group(0)  # absolute URL, anchor or site-absolute path: left alone
        path, _, anchor = target.partition("#")
        resolved = site_path(posixpath.normpath(posixpath.join(repo_dir, path)))
        if resolved is None:
            return match.group(0)  # mkdocs reports it as a broken link
        new = posixpath.relpath(resolved, posixpath.dirname(source)) + (f"#{anchor}" if anchor else "")
        return f"{match.group(1)}{new}{match.group(3)}"

    return LINK.sub(relink, markdown)
