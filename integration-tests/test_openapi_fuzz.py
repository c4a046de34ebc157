"""Property-based fuzz of the HTTP API from its own OpenAPI document (schemathesis): for every
operation, bodies generated from the document's schemas (and, for operations with a body, bodies
that violate them) must never get a 5xx, and every answer must have a documented status, content
type and body. Afterwards the server still serves."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from conftest import REPO, Server, launch
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode, checks

DOCUMENT = json.loads((REPO / "docs" / "reference" / "openapi.json").read_text())
OPERATIONS = [(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item]
WITH_BODY = [(m, p) for m, p in OPERATIONS if "requestBody" in DOCUMENT["paths"][p][m.lower()]]

# A few dozen bodies per operation keep the whole run near a minute on two cores; the seed is
# fixed (derandomize), so a failure reproduces. LORAX_FUZZ_EXAMPLES=500 fuzzes deeper.
EXAMPLES = int(os.environ.get("LORAX_FUZZ_EXAMPLES", "50"))
# Not `negative_data_rejection`: the router reads floats as f32, so a number a hair beyond a bound
# (2.0000000000000004 for a maximum of 2) is that bound once read, and rightly accepted.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Short generations: a generated `max_new_tokens` is bounded by --max-total-tokens.
    limits = ["--max-input-length", "24", "--max-total-tokens", "32", "--max-best-of", "2"]
    with launch(REPO / "models" / "demo", tmp_path_factory.mktemp("fuzz"), *limits) as server:
        yield server


@pytest.fixture(scope="module")
def schema(demo: Server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{demo.url}/api-doc/openapi.json")


def test_served_document_is_the_committed_one(demo: Server) -> None:
    served = requests.get(f"{demo.url}/api-doc/openapi.json", timeout=10).json()
    assert served["info"]["description"].startswith("Serving ")
    served["info"]["description"] = DOCUMENT["info"].get("description")
    assert served == DOCUMENT


def fuzz_operation(demo: Server, schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode) -> None:
    operation = schema[path][method]
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=demo.url, session=session, checks=CHECKS, timeout=60)

    fuzz()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_fuzz(demo: Server, schema: schemathesis.BaseSchema, method: str, path: str) -> None:
    fuzz_operation(demo, schema, method, path, GenerationMode.POSITIVE)


@pytest.mark.parametrize(("method", "path"), WITH_BODY, ids=[f"{m} {p}" for m, p in WITH_BODY])
def test_invalid_body_fuzz(demo: Server, schema: schemathesis.BaseSchema, method: str, path: str) -> None:
    fuzz_operation(demo, schema, method, path, GenerationMode.NEGATIVE)


def test_server_still_serves_after_the_fuzz(demo: Server) -> None:
    assert requests.get(f"{demo.url}/health", timeout=10).status_code == 200
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "ignore_eos_token": True}}
    r = requests.post(f"{demo.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["details"]["generated_tokens"] == 4
