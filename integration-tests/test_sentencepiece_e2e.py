"""A real SentencePiece tokenizer end to end (Mistral's, converted to tokenizer.json): for prompts and
outputs with leading and repeated spaces, accents, CJK, emoji, byte-fallback pieces and EOS, the
native stream, `generated_text`, `lorax-client` and the OpenAI endpoints, streamed or not, all give
the same text. The model is a tiny Llama whose weights make greedy decoding produce chosen pieces
(server/tests/sentencepiece_models.py); the launcher, router and shard run as they always do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import Server, launch
from sentencepiece_models import CASES, CUT_SHORT, IGNORE_EOS_TEXT, make_forced_llama

MAX_NEW = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_forced_llama(tmp_path_factory.mktemp("sentencepiece_llama"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with launch(model_dir, tmp_path_factory.mktemp("run")) as running:
        yield running


def native_stream(server: Server, prompt: str, **params) -> list[dict]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, **params}}
    with requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")]


def joined(events: list[dict]) -> str:
    return "".join(e["token"]["text"] for e in events if not e["token"]["special"])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_route_and_client_gives_the_same_text(server: Server, model_dir: Path, case) -> None:  # noqa: ANN001
    from lorax import Client
    from openai import OpenAI

    events = native_stream(server, case.prompt)
    assert events[-1]["token"] == {**events[-1]["token"], "text": "</s>", "special": True}
    assert joined(events) == events[-1]["generated_text"] == case.text
    body = {"inputs": case.prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
    answer = requests.post(f"{server.url}/generate", json=body, timeout=120).json()
    assert answer["generated_text"] == case.text and answer["details"]["finish_reason"] == "eos_token"

    client = Client(server.url)
    assert client.generate(case.prompt, max_new_tokens=MAX_NEW).generated_text == case.text
    streamed = list(client.generate_stream(case.prompt, max_new_tokens=MAX_NEW))
    assert "".join(r.token.text for r in streamed if not r.token.special) == case.text
    assert streamed[-1].generated_text == case.text

    openai = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    base = str(model_dir)  # any other `model` names an adapter
    completion = openai.completions.create(model=base, prompt=case.prompt, max_tokens=MAX_NEW)
    assert completion.choices[0].text == case.text
    chunks = openai.completions.create(model=base, prompt=case.prompt, max_tokens=MAX_NEW, stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == case.text


def test_text_after_eos_and_a_character_cut_short(server: Server) -> None:
    """With ignore_eos the stream carries `</s>` mid-way (special, left out of generated_text); a
    generation stopped inside a character ends with what the decoder makes of its bytes."""
    from lorax import Client

    client = Client(server.url)
    spaces, emoji = CASES[0], CASES[3]
    for max_new, text in IGNORE_EOS_TEXT.items():
        events = native_stream(server, spaces.prompt, max_new_tokens=max_new, ignore_eos_token=True)
        assert [e["token"]["text"] for e in events if e["token"]["special"]] == ["</s>"] * ((max_new - 1) // 2)
        assert joined(events) == events[-1]["generated_text"] == text
        answer = client.generate(spaces.prompt, max_new_tokens=max_new, ignore_eos_token=True)
        assert answer.generated_text == text
    for max_new, text in CUT_SHORT.items():
        events = native_stream(server, emoji.prompt, max_new_tokens=max_new)
        assert joined(events) == events[-1]["generated_text"] == text
        assert events[-1]["details"]["finish_reason"] == "length"
