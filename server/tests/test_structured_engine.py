"""Constrained decoding in the engine, on a tiny random model (which only writes valid JSON if the
constraint works): mixed constrained/unconstrained batches, greedy and sampled rows, continuous
batching, the length limit, ignore_eos, and penalties end to end against a transformers loop."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from test_engine import greedy_reference, make_engine, prompt
from transformers import AutoModelForCausalLM

from lorax_server.batch import RequestIn
from lorax_server.engine import Engine, RequestError
from lorax_server.grammar import GrammarKind, GrammarSpec
from lorax_server.sampling import SamplingParams
from lorax_server.stopping import FinishReason

# Bounded: short strings, small integers, enums and a short array, every property required and no
# others (strict generation), so a complete document always fits in MAX_NEW tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
        "role": {"enum": ["admin", "user", None]},
    },
    "required": ["name", "age", "member", "tags", "role"],
}
MAX_NEW = 160
JSON_SPEC = GrammarSpec(GrammarKind.JSON, json.dumps(PERSON))
DATE_RE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
REGEX_SPEC = GrammarSpec(GrammarKind.REGEX, DATE_RE)


@pytest.fixture(scope="module")
def engine(llama_dir) -> Engine:
    return make_engine(llama_dir)


@pytest.fixture(scope="module")
def reference(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def req(rid: int, ids: list[int], max_new: int = MAX_NEW, ignore_eos: bool = False, **kw) -> RequestIn:
    sampling = kw.pop("sampling", SamplingParams())
    return RequestIn(id=rid, input_ids=ids, sampling=sampling, max_new_tokens=max_new, ignore_eos=ignore_eos, **kw)


def run(engine: Engine, batch_id: int, requests: list[RequestIn], joining: dict[int, list[RequestIn]] | None = None):
    """Prefill, then decode to the end; `joining[step]` requests are prefilled at that step and merged
    into the running batch. Returns {id: (token ids, text, finish reason)}."""
    out: dict[int, tuple[list[int], str, FinishReason]] = {}
    tokens: dict[int, list[int]] = {}

    def collect(gens) -> None:  # noqa: ANN001
        for g in gens:
            tokens.setdefault(g.request_id, []).append(g.token_id)
            if g.finished is not None:
                out[g.request_id] = (tokens[g.request_id], g.finished.text, g.finished.reason)

    gens, batch = engine.prefill(batch_id, requests)
    collect(gens)
    step = 0
    while batch is not None:
        step += 1
        ids = [batch.id]
        for i, new in enumerate((joining or {}).get(step, [])):
            gens, joined = engine.prefill(batch_id * 100 + step * 10 + i, [new])
            collect(gens)
            if joined is not None:
                ids.append(joined.id)
        gens, batch = engine.decode(ids)
        collect(gens)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return out


def hot(seed: int) -> SamplingParams:
    return SamplingParams(do_sample=True, seed=seed, temperature=1.5)


def penalised(frequency: float, presence: float) -> SamplingParams:
    return SamplingParams(frequency_penalty=frequency, presence_penalty=presence)


def assert_valid_person(text: str) -> None:
    jsonschema.validate(json.loads(text), PERSON)


def test_mixed_batch_constrained_rows_are_valid_and_unconstrained_rows_equal_transformers(engine, reference) -> None:
    plain = [req(i, prompt(i, n), max_new=12, ignore_eos=True) for i, n in [(0, 5), (1, 11)]]
    greedy_json = req(10, prompt(10, 7), grammar=JSON_SPEC)
    sampled_json = [
        req(
            11 + s,
            prompt(11 + s, 4 + s),
            sampling=SamplingParams(do_sample=True, seed=s, temperature=1.5),
            grammar=JSON_SPEC,
        )
        for s in range(4)
    ]
    dates = [
        req(20, prompt(20, 6), grammar=REGEX_SPEC),
        req(21, prompt(21, 3), sampling=SamplingParams(do_sample=True, seed=7, top_k=50), grammar=REGEX_SPEC),
    ]
    requests = [plain[0], greedy_json, *sampled_json, plain[1], *dates]
    got = run(engine, 1, requests)
    for r in plain:
        assert got[r.id][0] == greedy_reference(reference, r.input_ids, 12)
    for r in [greedy_json, *sampled_json]:
        _, text, reason = got[r.id]
        assert reason == FinishReason.EOS_TOKEN, text
        assert_valid_person(text)
    assert len({got[r.id][1] for r in sampled_json}) > 1  # different seeds, different documents
    for r in dates:
        _, text, reason = got[r.id]
        assert reason == FinishReason.EOS_TOKEN and re.fullmatch(DATE_RE, text), text


def test_constrained_requests_give_the_same_output_alone_and_joining_a_running_batch(engine) -> None:
    constrained = [
        req(1, prompt(31, 9), grammar=JSON_SPEC),
        req(2, prompt(32, 5), sampling=SamplingParams(do_sample=True, seed=3), grammar=JSON_SPEC),
        req(3, prompt(33, 4), sampling=SamplingParams(do_sample=True, seed=4), grammar=REGEX_SPEC),
    ]
    alone = {r.id: run(engine, 40 + r.id, [r])[r.id] for r in constrained}
    running = [req(9, prompt(39, 8), max_new=40, ignore_eos=True)]
    together = run(engine, 50, running, joining={2: [constrained[0]], 5: [constrained[1], constrained[2]]})
    for r in constrained:
        assert together[r.id] == alone[r.id]


def test_length_limit_before_the_document_closes_says_length(engine) -> None:
    got = run(engine, 60, [req(1, prompt(61, 5), max_new=4, grammar=JSON_SPEC)])
    tokens, text, reason = got[1]
    assert reason == FinishReason.LENGTH and len(tokens) == 4
    assert text.startswith("{") and not _parses(text)


def test_ignore_eos_still_ends_where_the_grammar_ends(engine) -> None:
    got = run(engine, 70, [req(1, prompt(71, 5), ignore_eos=True, grammar=REGEX_SPEC)])
    tokens, text, reason = got[1]
    assert reason == FinishReason.EOS_TOKEN and tokens[-1] in engine.eos_ids
    assert re.fullmatch(DATE_RE, text), text


def test_stop_sequence_ends_a_constrained_request(engine) -> None:
    got = run(engine, 80, [req(1, prompt(81, 6), grammar=JSON_SPEC, stop_sequences=[": "])])
    _, text, reason = got[1]
    assert reason == FinishReason.STOP_SEQUENCE and text == '{"name": '


def test_any_json_object(engine) -> None:
    anything = GrammarSpec(GrammarKind.JSON, json.dumps({"type": "object"}))
    requests = [req(i, prompt(85 + i, 3 + i), max_new=96, grammar=anything) for i in range(6)]
    got = run(engine, 85, requests)
    ended = [text for _, text, reason in got.values() if reason == FinishReason.EOS_TOKEN]
    assert ended
    for text in ended:
        assert isinstance(json.loads(text), dict)


def test_uncompilable_grammar_is_refused_before_anything_is_allocated(engine) -> None:
    free = engine.blocks.num_free
    bad = req(1, prompt(91, 5), grammar=GrammarSpec(GrammarKind.JSON, '{"type": "strng"}'))
    with pytest.raises(RequestError, match="request 1: the json grammar cannot be compiled"):
        engine.prefill(90, [req(2, prompt(92, 5)), bad])
    assert engine.blocks.num_free == free and 90 not in engine.batches


@torch.no_grad()
def penalised_reference(model, ids: list[int], n: int, frequency: float, presence: float) -> list[int]:
    """Greedy decoding with OpenAI's penalties applied by hand to transformers' logits."""
    seq, generated = list(ids), []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        for t in set(generated):
            logits[t] -= frequency * generated.count(t) + presence
        generated.append(int(logits.argmax()))
        seq.append(generated[-1])
    return generated


def test_penalties_end_to_end_equal_a_transformers_loop(engine, reference) -> None:
    params = [(0.0, 0.0), (1.5, 0.0), (0.0, 2.0), (0.7, -0.3)]
    requests = [
        req(
            i,
            prompt(100 + i, 3 + i),
            max_new=14,
            ignore_eos=True,
            sampling=SamplingParams(frequency_penalty=f, presence_penalty=p),
        )
        for i, (f, p) in enumerate(params)
    ]
    got = run(engine, 100, requests)
    for r, (f, p) in zip(requests, params, strict=True):
        assert got[r.id][0] == penalised_reference(reference, r.input_ids, 14, f, p)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
