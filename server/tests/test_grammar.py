"""Grammars: every JSON Schema keyword the router lets through is enforced by the compiler, our
vocabulary (byte-level and SentencePiece) is read right, special tokens are never allowed as text,
compilation errors are clear, the cache compiles once, and the batched mask equals xgrammar's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from lorax_server.grammar import GrammarCompiler, GrammarError, GrammarKind, GrammarSpec, TokenMasks, unpack_bitmask

SUPPORT = json.loads((Path(__file__).parents[2] / "proto" / "json_schema_support.json").read_text())

# keyword → (schema, accepted output, refused output). The outputs use the grammar's separators.
KEYWORD_CASES = {
    "type": ({"type": "integer"}, "12", '"12"'),
    "enum": ({"enum": [1, "a", None]}, "null", "2"),
    "const": ({"const": "x"}, '"x"', '"y"'),
    "properties": ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a": 1}', '{"a": "1"}'),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, '{"a": 1}', "{}"),
    "additionalProperties": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        '{"b": 1}',
        '{"b": "x"}',
    ),
    "minProperties": ({"type": "object", "properties": {"a": {}, "b": {}}, "minProperties": 1}, '{"b": 1}', "{}"),
    "maxProperties": (
        {"type": "object", "properties": {"a": {}, "b": {}}, "maxProperties": 1},
        '{"a": 1}',
        '{"a": 1, "b": 2}',
    ),
    "items": ({"type": "array", "items": {"type": "integer"}}, "[1, 2]", '[1, "2"]'),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, '[1, "a"]', "[1, 2]"),
    "minItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1, 2]", "[1]"),
    "maxItems": ({"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "[1, 2]", "[1, 2, 3]"),
    "minLength": ({"type": "string", "minLength": 2}, '"ab"', '"a"'),
    "maxLength": ({"type": "string", "maxLength": 2}, '"ab"', '"abc"'),
    "pattern": ({"type": "string", "pattern": "^[a-z]+$"}, '"ab"', '"aB"'),
    "format": ({"type": "string", "format": "date"}, '"2024-01-02"', '"yesterday"'),
    "minimum": ({"type": "integer", "minimum": 3}, "3", "2"),
    "maximum": ({"type": "number", "maximum": 2.5}, "2.5", "2.75"),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 3}, "4", "3"),
    "exclusiveMaximum": ({"type": "integer", "exclusiveMaximum": 3}, "2", "3"),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, "9", "10"),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"x"'),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, '"x"', "true"),
    "$ref": ({"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"}, "1", '"1"'),
    "$defs": (
        {"$defs": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/n"}},
        "[1]",
        '["1"]',
    ),
    "definitions": ({"definitions": {"n": {"type": "boolean"}}, "$ref": "#/definitions/n"}, "false", "0"),
}

FORMAT_CASES = {
    "date": ("2024-01-02", "2024-1-2"),
    "time": ("03:04:05Z", "3 o'clock"),
    "date-time": ("2024-01-02T03:04:05Z", "2024-01-02"),
    "duration": ("P1DT2H", "1 day"),
    "email": ("ann@example.com", "ann at example"),
    "hostname": ("example.com", "exa mple"),
    "ipv4": ("10.0.0.1", "10.0.0"),
    "ipv6": ("::1", "1.2.3.4"),
    "uuid": ("123e4567-e89b-12d3-a456-426614174000", "123e4567"),
    "uri": ("https://example.com/a?b=c", "not a uri"),
    "uri-reference": ("/a/b", "a b"),
    "uri-template": ("/users/{id}", "/users/{id"),
    "json-pointer": ("/a/b", "a/b"),
    "relative-json-pointer": ("0/a", "/a"),
}


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


def matches(compiler: GrammarCompiler, spec: GrammarSpec, text: str, eos: int) -> bool:
    """Whether the grammar accepts exactly `text` (then end-of-sequence)."""
    m = compiler.matcher(spec)
    return (not text or m.accept_string(text)) and m.accept_token(eos) and m.is_terminated()


def test_every_supported_keyword_and_format_is_enforced(compiler: GrammarCompiler, tokenizer) -> None:
    assert set(KEYWORD_CASES) == set(SUPPORT["keywords"]), "each supported keyword needs an enforcement case"
    assert set(FORMAT_CASES) == set(SUPPORT["formats"]), "each supported format needs an enforcement case"
    cases = dict(KEYWORD_CASES)
    for f, (ok, bad) in FORMAT_CASES.items():
        cases[f"format {f}"] = ({"type": "string", "format": f}, json.dumps(ok), json.dumps(bad))
    eos = tokenizer.eos_token_id
    for name, (schema, ok, bad) in cases.items():
        spec = GrammarSpec(GrammarKind.JSON, json.dumps(schema))
        assert matches(compiler, spec, ok, eos), f"{name}: {ok!r} should match {schema}"
        assert not matches(compiler, spec, bad, eos), f"{name}: {bad!r} should not match {schema}"


def test_annotations_change_nothing(compiler: GrammarCompiler, tokenizer) -> None:
    schema = {"type": "integer", "minimum": 1}
    annotated = dict(schema, **{a: "x" for a in SUPPORT["annotations"] if not a.startswith("$")}, **{"$comment": "c"})
    for s in (schema, annotated):
        spec = GrammarSpec(GrammarKind.JSON, json.dumps(s))
        assert matches(compiler, spec, "5", tokenizer.eos_token_id)
        assert not matches(compiler, spec, "0", tokenizer.eos_token_id)


def test_json_has_no_free_whitespace(compiler: GrammarCompiler, tokenizer) -> None:
    spec = GrammarSpec(GrammarKind.JSON, json.dumps({"type": "array", "items": {"type": "integer"}}))
    eos = tokenizer.eos_token_id
    assert matches(compiler, spec, "[1, 2]", eos)
    assert not matches(compiler, spec, "[1,2]", eos)
    assert not matches(compiler, spec, " [1, 2]", eos)
    assert not matches(compiler, spec, "[1, 2]\n", eos)


def test_regex_and_json_or_text(compiler: GrammarCompiler, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    regex = GrammarSpec(GrammarKind.REGEX, r"[0-9]{3}-[a-z]+")
    assert matches(compiler, regex, "123-abc", eos)
    assert not matches(compiler, regex, "12-abc", eos)
    call = {"type": "object", "properties": {"name": {"const": "f"}}, "required": ["name"]}
    either = GrammarSpec(GrammarKind.JSON_OR_TEXT, json.dumps(call))
    for text in ['{"name": "f"}', "plain text { with braces }", "  indented text", ""]:
        assert matches(compiler, either, text, eos), text
    for text in ['{"name": "g"}', "{not json", '  {"name": "f"}']:
        assert not matches(compiler, either, text, eos), text


def test_special_tokens_never_text_and_eos_only_where_the_grammar_ends(compiler: GrammarCompiler, tokenizer) -> None:
    vocab = len(tokenizer)
    anything = compiler.matcher(GrammarSpec(GrammarKind.REGEX, r"[\s\S]*"))
    allowed = _mask(anything, vocab)
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    assert special and not any(allowed[i] for i in special)  # "<s>" would otherwise match as text
    assert allowed[tokenizer.eos_token_id]
    plain = tokenizer("ab", add_special_tokens=False)["input_ids"][0]
    assert allowed[plain]  # (lone UTF-8 continuation bytes are not: no text starts with one)
    digits = compiler.matcher(GrammarSpec(GrammarKind.REGEX, r"[0-9]+"))
    assert not _mask(digits, vocab)[tokenizer.eos_token_id]  # nothing generated yet: cannot end
    assert digits.accept_string("4")
    assert _mask(digits, vocab)[tokenizer.eos_token_id]


def _mask(matcher: xgr.GrammarMatcher, vocab: int) -> torch.Tensor:
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bitmask)
    return unpack_bitmask(bitmask, vocab)[0]


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_our_tokenization_of_valid_json_is_accepted_token_by_token(kind: str, llama_dir, tmp_path) -> None:
    """The vocabulary is decoded right: feeding the tokenizer's own tokens of a valid document is
    accepted (▁ word starts and <0xNN> byte pieces for SentencePiece, Ġ bytes for byte-level)."""
    if kind == "sentencepiece":
        from sentencepiece_models import convert_tokenizer

        tok = convert_tokenizer(tmp_path)
    else:
        tok = AutoTokenizer.from_pretrained(llama_dir)
    compiler = GrammarCompiler(tok, len(tok), {tok.eos_token_id})
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}}}
    doc = '{"city": "Zürich 東京 🙂 a  b", "n": 42}'
    # As generated after a prompt: SentencePiece marks only the text's very start with ▁.
    ids = tok("\n" + doc, add_special_tokens=False)["input_ids"]
    start = next(k for k in range(len(ids)) if tok.decode(ids[:k]).strip() == "" and tok.decode(ids[k:]) == doc)
    ids = ids[start:]
    m = compiler.matcher(GrammarSpec(GrammarKind.JSON, json.dumps(schema)))
    for i in ids:
        assert m.accept_token(i), f"token {tok.convert_ids_to_tokens(i)!r} refused"
    assert m.accept_token(tok.eos_token_id)


def test_bad_grammars_are_clear_errors(compiler: GrammarCompiler) -> None:
    with pytest.raises(GrammarError, match="not valid JSON"):
        compiler.compile(GrammarSpec(GrammarKind.JSON, "{"))
    with pytest.raises(GrammarError, match="regex grammar cannot be compiled") as err:
        compiler.compile(GrammarSpec(GrammarKind.REGEX, "(a"))
    assert not str(err.value).split(": ", 1)[1].startswith("[")  # no xgrammar timestamp prefix
    with pytest.raises(GrammarError, match="empty"):
        compiler.compile(GrammarSpec(GrammarKind.REGEX, ""))
    with pytest.raises(GrammarError, match="Unsupported type"):
        compiler.compile(GrammarSpec(GrammarKind.JSON, '{"type": "strng"}'))
    assert not compiler.is_cached(GrammarSpec(GrammarKind.REGEX, "(a"))


def test_each_grammar_compiles_once_and_the_cache_keeps_its_byte_budget(tokenizer, monkeypatch) -> None:
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, cache_bytes=1)
    calls = []
    real = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda spec: calls.append(spec) or real(spec))
    a, b = GrammarSpec(GrammarKind.REGEX, "a+"), GrammarSpec(GrammarKind.REGEX, "b+")
    first = compiler.compile(a)
    assert compiler.compile(a) is first and calls == [a]
    compiler.compile(b)  # over budget: the least recently used grammar goes, the newest stays
    assert compiler.is_cached(b) and not compiler.is_cached(a)
    compiler.compile(a)
    assert calls == [a, b, a]


def test_batched_masks_equal_the_torch_reference_and_leave_others_alone(compiler: GrammarCompiler, tokenizer) -> None:
    vocab = len(tokenizer)
    specs = [
        GrammarSpec(GrammarKind.REGEX, r"[0-9]+"),
        GrammarSpec(GrammarKind.JSON, json.dumps({"type": "object"})),
        GrammarSpec(GrammarKind.REGEX, r"(yes|no)"),
    ]
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0))
    for rows, batch in (([0, 1, 2], 3), ([1, 3, 4], 5)):  # every row constrained; some rows of a batch
        matchers = [compiler.matcher(s) for s in specs]
        masks = TokenMasks.fill(matchers, rows, batch, vocab, torch.device("cpu"))
        got = masks.apply_(logits[:batch].clone())
        for m, row in zip(matchers, rows, strict=True):  # the reference: one matcher, one unpacked row
            alone = xgr.allocate_token_bitmask(1, vocab)
            m.fill_next_token_bitmask(alone)
            expected = logits[row].masked_fill(~unpack_bitmask(alone, vocab)[0], float("-inf"))
            assert torch.equal(got[row], expected)
        for row in set(range(batch)) - set(rows):
            assert torch.equal(got[row], logits[row])


def test_strings_never_hold_raw_control_characters(compiler: GrammarCompiler, tokenizer) -> None:
    """JSON forbids unescaped U+0000..U+001F in strings, bounded-length strings included."""
    eos = tokenizer.eos_token_id
    for schema in ({"type": "string"}, {"type": "string", "maxLength": 5}, {"type": "string", "minLength": 1}):
        spec = GrammarSpec(GrammarKind.JSON, json.dumps(schema))
        assert matches(compiler, spec, '"aé"', eos)
        for bad in ('"a\x17"', '"a\tb"', '"\n"'):
            assert not matches(compiler, spec, bad, eos), (schema, bad)
