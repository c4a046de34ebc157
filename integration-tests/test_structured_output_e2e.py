"""Structured output over HTTP with the real clients (`openai` sync, async and streaming,
`lorax-client`, `text-generation`, `huggingface_hub`'s InferenceClient) on the demo model, which was
never trained to write JSON: every constrained answer parses and validates, greedy and sampled, with
and without an adapter, in batches that mix constrained and unconstrained requests; unconstrained
requests in those batches answer exactly what they answer alone. Bad schemas get a 422."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import requests
from conftest import REPO, Server, launch

DEMO = REPO / "models" / "demo"
ADAPTER = str(DEMO / "adapters" / "upper")
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "tags"],
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
NEW = 100  # more than the longest document PERSON allows, in tokens (prompts stay under 28)
PROMPTS = ["Q: Who is Ann?\nA:", "Q: Describe Bob.\nA:", "Q: Tell me about Cy.\nA:", "Q: Who won?\nA:"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Room for the tool definitions the chat template is given (the demo's vocabulary is small).
    limits = ["--max-input-length", "420", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "2048"]
    with launch(DEMO, tmp_path_factory.mktemp("structured"), *limits) as server:
        yield server


def generate(server: Server, prompt: str, **parameters) -> requests.Response:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW, "details": True, **parameters}}
    return requests.post(f"{server.url}/generate", json=body, timeout=120)


def valid_person(text: str) -> dict:
    doc = json.loads(text)
    jsonschema.validate(doc, PERSON)
    return doc


def test_lorax_client_response_format_greedy_sampled_and_with_an_adapter(demo: Server) -> None:
    from lorax import Client

    client = Client(demo.url, timeout=120)
    fmt = {"type": "json_object", "schema": PERSON}
    runs = [
        {},
        {"do_sample": True, "seed": 1, "temperature": 1.3},
        {"do_sample": True, "seed": 2, "top_k": 40},
        {"adapter_id": ADAPTER, "adapter_source": "local"},
        {"adapter_id": ADAPTER, "adapter_source": "local", "do_sample": True, "seed": 3},
    ]
    for kw in runs:
        out = client.generate(PROMPTS[0], max_new_tokens=NEW, response_format=fmt, **kw)
        assert out.details.finish_reason == "eos_token", (kw, out.generated_text)
        valid_person(out.generated_text)
    # "any JSON object" (lorax-client insists on a schema; the API does not): when the answer ends
    # within the budget, it is an object.
    out = generate(demo, PROMPTS[1], response_format={"type": "json_object"}).json()
    if out["details"]["finish_reason"] == "eos_token":
        assert isinstance(json.loads(out["generated_text"]), dict)
    else:
        assert out["generated_text"].startswith("{")


def test_tgi_grammar_forms_with_text_generation_client(demo: Server) -> None:
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    client = Client(demo.url, timeout=120)
    for seed in (None, 5):
        sampled = {"do_sample": True, "seed": seed} if seed else {}
        out = client.generate(
            PROMPTS[2], max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex, value=DATE), **sampled
        )
        assert re.fullmatch(DATE, out.generated_text), out.generated_text
        out = client.generate(
            PROMPTS[2], max_new_tokens=NEW, grammar=Grammar(type=GrammarType.Json, value=PERSON), **sampled
        )
        valid_person(out.generated_text)
    # The schema as a JSON string is the same grammar.
    r = generate(demo, PROMPTS[2], grammar={"type": "json", "value": json.dumps(PERSON)})
    assert r.status_code == 200, r.text
    valid_person(r.json()["generated_text"])


def test_mixed_concurrent_batch_constrained_valid_unconstrained_unchanged(demo: Server) -> None:
    plain = [(p, {"max_new_tokens": 24, "ignore_eos_token": True}) for p in PROMPTS]
    alone = [generate(demo, p, **kw).json()["generated_text"] for p, kw in plain]
    constrained = [
        (p, {"response_format": {"type": "json_object", "schema": PERSON}, **extra})
        for p in PROMPTS
        for extra in ({}, {"do_sample": True, "seed": 11}, {"adapter_id": ADAPTER, "adapter_source": "local"})
    ]
    jobs = [*constrained[:6], *plain, *constrained[6:]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: generate(demo, job[0], **job[1]), jobs))
    for (_, kw), r in zip(jobs, answers, strict=True):
        assert r.status_code == 200, r.text
        if "response_format" in kw:
            valid_person(r.json()["generated_text"])
    got_plain = [
        r.json()["generated_text"] for (_, kw), r in zip(jobs, answers, strict=True) if "ignore_eos_token" in kw
    ]
    assert got_plain == alone


def openai_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def test_openai_sync_async_and_streaming(demo: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Describe a person."}]
    for kw in ({}, {"temperature": 1.0, "seed": 4}, {"model": ADAPTER}):
        out = client.chat.completions.create(
            model=kw.pop("model", ""), messages=messages, max_tokens=NEW, response_format=openai_format(), **kw
        )
        assert out.choices[0].finish_reason == "stop"
        valid_person(out.choices[0].message.content)
    out = client.chat.completions.create(
        model="", messages=messages, max_tokens=NEW, response_format={"type": "json_object"}
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    stream = client.chat.completions.create(
        model="",
        messages=messages,
        max_tokens=NEW,
        response_format=openai_format(),
        stream=True,
        seed=9,
        temperature=0.8,
    )
    valid_person("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    completion = client.completions.create(
        model="", prompt=PROMPTS[3], max_tokens=NEW, extra_body={"response_format": openai_format()}
    )
    valid_person(completion.choices[0].text)

    async def concurrent() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{demo.url}/v1", api_key="unused")
        calls = [
            aclient.chat.completions.create(
                model="",
                messages=[{"role": "user", "content": p}],
                max_tokens=NEW,
                response_format=openai_format(),
                seed=i,
                temperature=1.0,
            )
            for i, p in enumerate(PROMPTS)
        ]
        return await asyncio.gather(*calls)

    for out in asyncio.run(concurrent()):
        valid_person(out.choices[0].message.content)


def test_bad_schemas_and_grammars_get_422_with_a_message(demo: Server) -> None:
    cases = [
        ({"response_format": {"type": "json_object", "schema": {"type": 5}}}, "response_format.schema"),
        ({"response_format": {"type": "json_object", "schema": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
        ({"response_format": {"type": "json_object", "schema": {"type": "string", "format": "bogus"}}}, "bogus"),
        ({"response_format": {"type": "json_object", "schema": {"enum": ["x" * 70000]}}}, "bytes"),
        ({"response_format": {"type": "json_schema"}}, "schema"),
        ({"response_format": {"type": "xml"}}, "xml"),
        ({"grammar": {"type": "regex", "value": "(unclosed"}}, "regex"),
        ({"grammar": {"type": "json", "value": PERSON}, "response_format": {"type": "json_object"}}, "grammar"),
    ]
    for parameters, needle in cases:
        r = generate(demo, PROMPTS[0], **parameters)
        assert r.status_code == 422, (parameters, r.text)
        assert needle in r.json()["error"], (needle, r.json()["error"])
    assert generate(demo, PROMPTS[0], max_new_tokens=4).status_code == 200  # the server is fine


def test_penalties_are_validated_and_applied(demo: Server) -> None:
    for value, status in [("0.5", 422), (True, 422), (2.5, 422), (-2.1, 422), (1.5, 200)]:
        for field in ("presence_penalty", "frequency_penalty"):
            r = generate(demo, PROMPTS[0], max_new_tokens=8, **{field: value})
            assert r.status_code == status, (field, value, r.text)
            if status == 422:
                assert field in r.json()["error"]
    import openai

    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused")
    plain = client.completions.create(model="", prompt=PROMPTS[1], max_tokens=16)
    penalised = client.completions.create(
        model="", prompt=PROMPTS[1], max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0
    )
    native = generate(demo, PROMPTS[1], max_new_tokens=16, frequency_penalty=2.0, presence_penalty=2.0).json()
    assert penalised.choices[0].text == native["generated_text"]
    tokens = [t["id"] for t in native["details"]["tokens"]]
    assert plain.choices[0].text != penalised.choices[0].text or len(set(tokens)) == len(tokens)


def test_huggingface_hub_inference_client(demo: Server) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=demo.url)
    out = client.text_generation(PROMPTS[0], max_new_tokens=8, details=True)
    base = generate(demo, PROMPTS[0], max_new_tokens=8).json()["generated_text"]
    assert out.generated_text == base and out.details.generated_tokens == 8
    events = list(client.text_generation(PROMPTS[0], max_new_tokens=8, stream=True, details=True))
    assert "".join(e.token.text for e in events if not e.token.special) == base
    assert events[-1].generated_text == base
    with_adapter = client.text_generation(PROMPTS[0], max_new_tokens=8, adapter_id=ADAPTER, details=True)
    expected = generate(demo, PROMPTS[0], max_new_tokens=8, adapter_id=ADAPTER, adapter_source="local").json()
    assert with_adapter.generated_text == expected["generated_text"]
    chat = InferenceClient(base_url=f"{demo.url}/v1").chat_completion(
        [{"role": "user", "content": "Describe a person."}], max_tokens=NEW, response_format=openai_format()
    )
    valid_person(chat.choices[0].message.content)


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 4}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# The demo model reads 512 positions: a short instruction keeps two tools' definitions within them.
SHORT = {"tool_prompt": "Answer with a call."}


def check_call(call, tools=(WEATHER, TIME)) -> str:  # noqa: ANN001
    """The call names one of `tools` and its arguments (a JSON string) validate; returns the name."""
    assert call.type == "function" and call.id.startswith("call_")
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])
    return call.function.name


def test_openai_tool_calls_required_named_none_and_auto(demo: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused")
    common = {"model": "", "messages": ASK, "max_tokens": 60, "tools": [WEATHER, TIME], "extra_body": SHORT}
    for kw in ({}, {"temperature": 1.0, "seed": 3}, {"model": ADAPTER}):
        out = client.chat.completions.create(**{**common, **kw}, tool_choice="required")
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_call(choice.message.tool_calls[0])
    named = {"type": "function", "function": {"name": "time"}}
    out = client.chat.completions.create(**common, tool_choice=named, temperature=1.0, seed=8)
    assert check_call(out.choices[0].message.tool_calls[0]) == "time"
    out = client.chat.completions.create(**common, tool_choice="none")
    assert out.choices[0].message.tool_calls is None and isinstance(out.choices[0].message.content, str)
    for seed in range(3):  # auto: text, or a call that is constrained once it starts
        out = client.chat.completions.create(**common, tool_choice="auto", temperature=1.0, seed=seed)
        choice = out.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            check_call(choice.message.tool_calls[0])
        else:
            assert not choice.message.content.lstrip().startswith("{")


def test_openai_tool_calls_stream_as_deltas_and_take_tool_turns(demo: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="", messages=ASK, max_tokens=60, tools=[WEATHER], tool_choice="required", stream=True
    )
    chunks = [c for c in stream if c.choices]
    calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "weather"
    arguments = "".join(d.function.arguments or "" for d in calls)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    whole = client.chat.completions.create(
        model="", messages=ASK, max_tokens=80, tools=[WEATHER], tool_choice="required"
    )
    assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == json.loads(arguments)
    # The call and its result go back in the conversation, as the OpenAI client sends them.
    call = whole.choices[0].message.tool_calls[0]
    follow_up = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    out = client.chat.completions.create(
        model="", messages=follow_up, max_tokens=8, tools=[WEATHER], tool_choice="none"
    )
    assert isinstance(out.choices[0].message.content, str)


def test_bad_tools_get_422(demo: Server) -> None:
    url = f"{demo.url}/v1/chat/completions"
    bad_params = {**WEATHER["function"], "parameters": {"type": "object", "not": {"required": ["city"]}}}
    cases = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tools": [WEATHER, WEATHER]}, "weather"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
        ({"tools": [{"type": "function", "function": bad_params}]}, "`not`"),
        ({"tool_choice": "required"}, "tools"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
    ]
    for extra, needle in cases:
        r = requests.post(url, json={"model": "", "messages": ASK, "max_tokens": 8, **extra}, timeout=60)
        assert r.status_code == 422, (extra, r.text)
        assert needle in r.json()["error"], (needle, r.json()["error"])
