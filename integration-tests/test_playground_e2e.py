"""The playground page (`GET /playground`) in headless Chromium, against the demo model and one of
its adapters: what the page streams equals the API's own answers, its curl command gives the same
answer when run, and an invalid request shows the API's error. Chromium is Debian's
(`make chromium` installs it), driven by playwright."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import REPO, Server, launch
from playwright.sync_api import Browser, Page, expect, sync_playwright

DEMO = REPO / "models" / "demo"
# Local adapter paths as a user types them: relative to where the server runs (the launcher runs in
# the tests' working directory).
REVERSE = os.path.relpath(DEMO / "adapters" / "reverse")
FORMAT = os.path.relpath(DEMO / "adapters" / "answer-format")
CHROMIUM = Path(os.environ.get("LORAX_CHROMIUM", "/usr/bin/chromium"))
DONE = re.compile(r"^(done|failed)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with launch(DEMO, tmp_path_factory.mktemp("playground")) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make chromium` installs Debian's chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, demo: Server) -> Iterator[Page]:
    """The playground, opened fresh; it must request nothing from anywhere but the server, and
    raise no script error."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    urls: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{demo.url}/playground")
    expect(page.locator("#model")).to_contain_text("demo")
    yield page
    page.close()
    assert errors == []
    assert urls and all(u.startswith(demo.url + "/") for u in urls), urls


def run_page(page: Page) -> str:
    """Clicks Generate and waits for the answer to end; the streamed text."""
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE, timeout=60_000)
    return page.locator("#output").text_content() or ""


def run_curl(page: Page) -> list[dict]:
    """Runs the page's curl command; the JSON payloads of its SSE answer."""
    command = page.locator("#curl").text_content() or ""
    assert command.startswith("curl -N http://127.0.0.1:")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, check=True).stdout
    data = [line[len("data:") :].strip() for line in out.splitlines() if line.startswith("data:")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def test_generate_streams_the_api_answer(page: Page, demo: Server) -> None:
    prompt = "Q: Copy: red cat blue\nA:"
    parameters = {"max_new_tokens": 12, "adapter_id": REVERSE, "adapter_source": "local", "details": True}
    r = requests.post(f"{demo.url}/adapters/load", json={"adapter_id": REVERSE, "adapter_source": "local"})
    assert r.status_code == 200, r.text
    page.click("#refresh")  # the list now holds the loaded adapter: pick it
    expect(page.locator(f"#adapter-list option[value='{REVERSE}']")).to_have_count(1)
    page.select_option("#adapter-list", REVERSE)
    assert page.input_value("#adapter_id") == REVERSE and page.input_value("#adapter_source") == "local"
    page.fill("#prompt", prompt)
    page.fill("#max_new_tokens", "12")
    streamed = run_page(page)
    assert page.locator("#error").is_hidden()
    assert page.input_value("#adapter-list") == REVERSE  # still picked after the list's refresh

    want = requests.post(f"{demo.url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120)
    assert want.status_code == 200, want.text
    want = want.json()
    base = requests.post(f"{demo.url}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 12}})
    assert streamed == want["generated_text"] != base.json()["generated_text"]  # the adapter answered

    # Token details, on demand: the same ids and logprobs as /generate's.
    assert page.locator("#tokens").is_hidden()
    page.click("#token-details summary")
    rows = page.locator("#tokens tr")
    expect(rows).to_have_count(len(want["details"]["tokens"]))
    for i, token in enumerate(want["details"]["tokens"]):
        cells = rows.nth(i).locator("td").all_text_contents()
        assert int(cells[1]) == token["id"] and abs(float(cells[3]) - token["logprob"]) < 1e-3

    if "PLAYGROUND_SCREENSHOT" in os.environ:  # refreshes docs/images/playground.png
        page.screenshot(path=os.environ["PLAYGROUND_SCREENSHOT"], full_page=True)

    events = run_curl(page)
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == streamed
    assert events[-1]["generated_text"] == streamed


def test_chat_mode_streams_the_openai_answer(page: Page, demo: Server) -> None:
    page.check("input[name=mode][value=chat]")
    page.fill("#prompt", "What is 12 + 7?")
    page.fill("#adapter_id", FORMAT)  # free text: an adapter the server has not loaded yet
    page.select_option("#adapter_source", "local")
    streamed = run_page(page)
    assert page.locator("#error").is_hidden()

    body = {
        "model": FORMAT,
        "adapter_source": "local",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "What is 12 + 7?"}],
    }
    r = requests.post(f"{demo.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert streamed == r.json()["choices"][0]["message"]["content"]
    assert streamed.startswith(" Answer:")  # the adapter's format
    expect(page.locator("#token-count")).not_to_have_text("0")

    chunks = run_curl(page)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == streamed


@pytest.mark.parametrize(
    ("fields", "source", "parameters"),
    [
        ({"#top_p": "1.5"}, "", {"top_p": 1.5}),
        ({"#adapter_id": "org/lora"}, "pbase", {"adapter_id": "org/lora", "adapter_source": "pbase"}),
    ],
)
def test_invalid_request_shows_the_api_error(
    page: Page, demo: Server, fields: dict[str, str], source: str, parameters: dict
) -> None:
    page.fill("#prompt", "Q: Hi\nA:")
    for field, value in fields.items():
        page.fill(field, value)
    page.select_option("#adapter_source", source)
    assert run_page(page) == ""
    expect(page.locator("#status")).to_have_text("failed")

    body = {"inputs": "Q: Hi\nA:", "parameters": {"max_new_tokens": 32, **parameters}}
    r = requests.post(f"{demo.url}/generate_stream", json=body, timeout=60)
    assert r.status_code == 422, r.text
    error = r.json()
    shown = page.locator("#error")
    expect(shown).to_be_visible()
    expect(shown).to_have_text(f"422 {error['error_type']}: {error['error']}")
