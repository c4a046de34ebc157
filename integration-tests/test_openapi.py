"""The OpenAPI document the router serves is a valid OpenAPI 3 document that lists every route."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from conftest import REPO, Server, launch
from openapi_spec_validator import validate

ROUTES = ["/", "/generate", "/generate_stream", "/health", "/info", "/metrics", "/tokenize", "/adapters",
          "/adapters/load", "/adapters/unload", "/adapters/pin", "/adapters/unpin", "/v1/completions",
          "/v1/chat/completions", "/v1/models"]  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with launch(REPO / "models" / "demo", tmp_path_factory.mktemp("openapi")) as server:
        yield server


def test_document_validates_and_lists_every_route(demo: Server) -> None:
    document = requests.get(f"{demo.url}/api-doc/openapi.json", timeout=10).json()
    validate(document)  # raises with the offending part
    assert sorted(set(ROUTES) - set(document["paths"])) == []
    docs_page = requests.get(f"{demo.url}/docs", timeout=10)
    assert docs_page.status_code == 200 and "text/html" in docs_page.headers["content-type"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": "Q: What is 2 + 3?\nA:", "parameters": {"max_new_tokens": 4}}),
        ("/", {"inputs": "Q: What is 2 + 3?\nA:", "parameters": {"max_new_tokens": 4}}),
        ("/v1/completions", {"model": "", "prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 4}),
        ("/v1/chat/completions", {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ],
)
def test_documented_answer_headers_are_the_ones_sent(demo: Server, path: str, body: dict) -> None:
    document = requests.get(f"{demo.url}/api-doc/openapi.json", timeout=10).json()
    documented = set(document["paths"][path]["post"]["responses"]["200"]["headers"])
    answer = requests.post(f"{demo.url}{path}", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    sent = {name.lower() for name in answer.headers if name.lower().startswith("x-")}
    assert sent == documented
