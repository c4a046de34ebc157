"""Every limit and every kind of bad input gets the right status and a JSON error body, and never
harms the server: after each one a good request succeeds and /health stays 200."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import launch

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 40  # far more than 64 tokens

VALIDATION_CASES = {
    "input too long": {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 4}},
    "input + max_new_tokens over max_total_tokens": {
        "inputs": "hello",
        "parameters": {"max_new_tokens": 127},
    },
    "max_new_tokens zero": {"inputs": "hello", "parameters": {"max_new_tokens": 0}},
    "too many stop sequences": {"inputs": "hello", "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
    "best_of over max_best_of": {"inputs": "hello", "parameters": {"best_of": 3, "do_sample": True}},
    "best_of without sampling": {"inputs": "hello", "parameters": {"best_of": 2}},
    "negative temperature": {"inputs": "hello", "parameters": {"temperature": -1.0}},
    "top_p above one": {"inputs": "hello", "parameters": {"top_p": 1.5}},
    "top_k zero": {"inputs": "hello", "parameters": {"top_k": 0}},
    "typical_p zero": {"inputs": "hello", "parameters": {"typical_p": 0.0}},
    "repetition_penalty zero": {"inputs": "hello", "parameters": {"repetition_penalty": 0.0}},
    "empty inputs": {"inputs": "", "parameters": {}},
    "truncate over max_input_length": {"inputs": "hello", "parameters": {"truncate": 1000}},
    "unknown adapter source": {"inputs": "hello", "parameters": {"adapter_id": "a", "adapter_source": "ftp"}},
    "merged_adapters without ids": {"inputs": "hello", "parameters": {"merged_adapters": {"ids": []}}},
}


def assert_still_serving(server) -> None:
    ok = requests.post(
        f"{server.url}/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}}, timeout=60
    )
    assert ok.status_code == 200, ok.text
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def assert_error(r: requests.Response, status: int, error_type: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["error_type"] == error_type and body["error"], body
    return body


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_validation_errors_are_422(server, case: str) -> None:
    r = requests.post(f"{server.url}/generate", json=VALIDATION_CASES[case], timeout=60)
    assert_error(r, 422, "validation")
    assert_still_serving(server)


def test_validation_error_mid_stream_route_is_422_too(server) -> None:
    r = requests.post(f"{server.url}/generate_stream", json=VALIDATION_CASES["input too long"], timeout=60)
    assert_error(r, 422, "validation")


def test_truncate_keeps_the_last_tokens_and_serves(server) -> None:
    r = requests.post(
        f"{server.url}/generate",
        json={"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 2, "truncate": 10, "details": True}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["details"]["prompt_tokens"] == 10


def test_malformed_json_is_400(server) -> None:
    r = requests.post(
        f"{server.url}/generate",
        data=b'{"inputs": "hi", ',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert_error(r, 400, "bad_request")
    r = requests.post(f"{server.url}/generate", json={"parameters": {}}, timeout=10)  # no inputs
    assert r.status_code in (400, 422) and r.json()["error"]
    assert_still_serving(server)


def test_wrong_content_type_is_415(server) -> None:
    r = requests.post(f"{server.url}/generate", data=b'{"inputs": "hi"}', headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    assert_still_serving(server)


def test_body_too_large_is_413(server) -> None:
    r = requests.post(f"{server.url}/generate", json={"inputs": "x" * (3 * 2**20)}, timeout=60)
    assert_error(r, 413, "payload_too_large")
    assert_still_serving(server)


def test_unknown_route_is_a_json_404(server) -> None:
    assert_error(requests.get(f"{server.url}/nope", timeout=10), 404, "not_found")


def test_over_max_concurrent_requests_is_429(llama_dir, tmp_path) -> None:
    with launch(llama_dir, tmp_path, "--max-concurrent-requests", "2") as server:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 60, "ignore_eos_token": True}}
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(lambda _: requests.post(f"{server.url}/generate", json=body, timeout=120), range(8))
            )
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 429 in statuses, statuses
        for r in responses:
            if r.status_code == 429:
                assert_error(r, 429, "overloaded")
        assert_still_serving(server)
