"""The demo model's LoRA adapters (`models/demo/adapters/`), served the way `make run` serves them:
mixed concurrent requests for the base and every adapter, on inputs none of them was trained on, each
get their adapter's skill; and the served answer equals peft + transformers for the same adapter."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from conftest import REPO, Server, launch

sys.path.insert(0, str(REPO / "scripts"))

from train_demo_adapters import held_out_sets  # noqa: E402

DEMO = REPO / "models" / "demo"
ADAPTERS = ["reverse", "upper", "answer-format"]
PER_SET = 4  # held-out prompts per evaluation set of each adapter


def cases() -> list[tuple[str, str, str]]:
    """(adapter, Q/A prompt, expected answer) on held-out inputs: a few from every evaluation set."""
    rng = random.Random(0)
    out = []
    for name in ADAPTERS:
        for examples in held_out_sets(name).values():
            out += [(name, f"Q: {q}\nA:", " " + a) for q, a in rng.sample(examples, PER_SET)]
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with launch(DEMO, tmp_path_factory.mktemp("demo-adapters")) as server:
        yield server


def generate(server: Server, prompt: str, adapter: str | None, **params) -> dict:
    parameters = {"max_new_tokens": 16, "details": True, **params}
    if adapter is not None:
        parameters.update(adapter_id=str(DEMO / "adapters" / adapter), adapter_source="local")
    r = requests.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_adapters_are_standard_peft_files() -> None:
    import json

    from safetensors import safe_open

    for name in [*ADAPTERS, "quote"]:
        folder = DEMO / "adapters" / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "models/demo"
        with safe_open(folder / "adapter_model.safetensors", "pt") as f:
            assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in set(f.keys())


def test_mixed_concurrent_requests_show_each_skill(demo: Server) -> None:
    """Every adapter's held-out prompts and the same prompts on the base, all sent at once, shuffled."""
    skill = cases()
    requests_ = [(name, prompt) for name, prompt, _ in skill] + [(None, prompt) for _, prompt, _ in skill]
    random.Random(1).shuffle(requests_)
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda c: generate(demo, c[1], c[0]), requests_))
    got = dict(zip(requests_, replies, strict=True))
    for name in ADAPTERS:
        mine = [(prompt, want) for adapter, prompt, want in skill if adapter == name]
        wrong = []
        for prompt, want in mine:
            answer = got[(name, prompt)]
            if answer["generated_text"] != want or answer["details"]["finish_reason"] != "eos_token":
                wrong.append((prompt, want, answer["generated_text"]))
            assert got[(None, prompt)]["generated_text"] != want, (prompt, "the base already answers this way")
        # Exact answers; the adapters' documented held-out accuracy is >= 90% (reverse misses some
        # six-letter strings), so one miss in ten is allowed.
        assert len(wrong) <= len(mine) // 10, (name, wrong)


def test_same_prompt_four_answers(demo: Server) -> None:
    """The README's example: one prompt, answered by the base and each adapter."""
    prompt = "Q: Copy: blue fox\nA:"
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda a: generate(demo, prompt, a)["generated_text"], [None, *ADAPTERS]))
    assert got == [" blue fox", " fox blue", " BLUE FOX", " Answer: blue fox."]


def test_served_adapters_equal_peft(demo: Server) -> None:
    """Greedy tokens through the router equal peft + transformers with the same adapter files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    base = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, DEMO / "adapters" / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(DEMO / "adapters" / name, adapter_name=name)
    model.eval()
    prompts = ["Q: Copy: green moon river\nA:", "Q: What is 13 + 6?\nA:"]
    for name in ADAPTERS:
        model.set_adapter(name)
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                want = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
                )[0, ids.shape[1] :].tolist()
            reply = generate(demo, prompt, name, max_new_tokens=12)
            assert [t["id"] for t in reply["details"]["tokens"]] == want, (name, prompt)


def test_openai_chat_with_an_adapter(demo: Server) -> None:
    """The OpenAI endpoint takes the adapter as `model`; the adapters learnt the chat template too."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{demo.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=str(DEMO / "adapters" / "upper"),
        messages=[{"role": "user", "content": "Uppercase: green moon river"}],
        max_tokens=16,
        temperature=0,
        extra_body={"adapter_source": "local"},
    )
    assert reply.choices[0].message.content.strip() == "GREEN MOON RIVER"


def test_an_adapter_with_its_own_chat_template(demo: Server, tmp_path: Path) -> None:
    """An adapter whose files carry a chat template (as `transformers` saves one) gets its requests
    rendered with it, on the OpenAI and the native endpoints; the prompt tokens equal
    `transformers`' `apply_chat_template` with the adapter's tokenizer files."""
    import json
    import shutil

    from openai import OpenAI
    from transformers import AutoTokenizer

    adapter = tmp_path / "upper-qa"
    shutil.copytree(DEMO / "adapters" / "upper", adapter)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    tokenizer.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    tokenizer.save_pretrained(adapter)
    messages = [{"role": "user", "content": "Uppercase: green moon river"}]

    def prompt_ids(folder: Path) -> list[int]:
        rendered = AutoTokenizer.from_pretrained(folder).apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True
        )
        return list(rendered["input_ids"])

    own = prompt_ids(adapter)
    assert own != prompt_ids(DEMO)

    params = {"adapter_id": str(adapter), "adapter_source": "local", "max_new_tokens": 12, "details": True}
    native = requests.post(
        f"{demo.url}/generate",
        json={"inputs": json.dumps(messages), "parameters": {
            **params, "apply_chat_template": True, "decoder_input_details": True}},
        timeout=120,
    ).json()  # fmt: skip
    assert [t["id"] for t in native["details"]["prefill"]] == own
    client = OpenAI(base_url=f"{demo.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=str(adapter), messages=messages, max_tokens=12, temperature=0, extra_body={"adapter_source": "local"}
    )
    assert reply.usage.prompt_tokens == len(own)
    assert reply.choices[0].message.content == native["generated_text"]
