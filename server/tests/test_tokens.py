"""Streaming detokenization == full decode, on tokenizers built here (no hub)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sentencepiece_models import convert_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lorax_server.utils.tokens import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "Streaming text one token at a time; spaces   and\nnewlines\n\nmatter.",
    "café naïve résumé über straße",
    "你好，世界。日本語のテキスト。",
    "emoji 😀 🎉 👍",
]
TEXTS = [
    "Hello, world!",
    " leading space and trailing space ",
    "café naïve — résumé\n\n  indented\tTab",
    "你好，世界！漢字とかな、한국어",
    "emoji 😀😀 🎉 family 👨‍👩‍👧 flags 🇫🇷 and 🤖 robots",
    "mixed: 価格は€100です 🍣\nnext line",
    "\n\n   \n",
]
SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_level_bpe() -> Tokenizer:
    """GPT-2 style: byte-level pre-tokenizer and decoder, BPE trained on the tiny corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


def byte_fallback_bpe() -> Tokenizer:
    """Llama style: Metaspace "▁", BPE with <0xNN> byte-fallback tokens, Replace/ByteFallback/Fuse/Strip."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, limit_alphabet=60, show_progress=False)
    tok.train_from_iterator(CORPUS[:3] * 5, trainer)  # CJK and emoji are left to the byte tokens
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def as_transformers(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Mistral's real SentencePiece tokenizer, converted to tokenizer.json by transformers."""
    return convert_tokenizer(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(
    scope="module", params=["byte_level", "byte_fallback", "byte_level_hf", "byte_fallback_hf", "sentencepiece"]
)
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer | PreTrainedTokenizerFast:
    if request.param == "sentencepiece":
        return request.getfixturevalue("sentencepiece")
    base = byte_level_bpe() if request.param.startswith("byte_level") else byte_fallback_bpe()
    return as_transformers(base) if request.param.endswith("_hf") else base


def special_ids(tokenizer: Tokenizer | PreTrainedTokenizerFast) -> set[int]:
    if isinstance(tokenizer, Tokenizer):
        return {tokenizer.token_to_id(t) for t in SPECIALS}
    return set(tokenizer.all_special_ids)


def encode(tokenizer: Tokenizer | PreTrainedTokenizerFast, text: str) -> list[int]:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer: Tokenizer | PreTrainedTokenizerFast, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def stream(tokenizer: Tokenizer | PreTrainedTokenizerFast, prompt: list[int], generated: list[int]) -> list[str]:
    det = IncrementalDetokenizer(tokenizer, prompt)
    return [det.step(t) for t in generated]


def is_boundary(tokenizer: Tokenizer | PreTrainedTokenizerFast, ids: list[int], k: int) -> bool:
    """Whether ids[:k] ends on a character boundary of the full text."""
    head = decode(tokenizer, ids[:k])
    return "\ufffd" not in head and decode(tokenizer, ids).startswith(head)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_without_prompt_equals_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = encode(tokenizer, text)
    pieces = stream(tokenizer, [], ids)
    assert "".join(pieces) == decode(tokenizer, ids)
    assert not any("\ufffd" in p for p in pieces)  # incomplete characters are held back, never emitted


@pytest.mark.parametrize("text", TEXTS)
def test_stream_after_prompt_continues_the_prompt_text(tokenizer: Tokenizer, text: str) -> None:
    prompt_text = "Say something: "
    ids = encode(tokenizer, prompt_text + text)
    full = decode(tokenizer, ids)
    for k in range(1, len(ids)):
        if not is_boundary(tokenizer, ids, k):
            continue
        pieces = stream(tokenizer, ids[:k], ids[k:])
        assert "".join(pieces) == full[len(decode(tokenizer, ids[:k])) :], k
        assert not any("\ufffd" in p for p in pieces)


def test_byte_level_stream_equals_decode_of_generated_ids() -> None:
    tok = byte_level_bpe()
    for text in TEXTS:
        ids = encode(tok, "prompt words " + text)
        for k in range(1, len(ids)):
            if is_boundary(tok, ids, k):
                assert "".join(stream(tok, ids[:k], ids[k:])) == decode(tok, ids[k:])


def test_multibyte_character_is_emitted_whole_when_complete() -> None:
    tok = byte_fallback_bpe()
    ids = encode(tok, "a😀")
    emoji_bytes = [tok.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert ids[-4:] == emoji_bytes
    assert stream(tok, [], ids)[-4:] == ["", "", "", "😀"]


@pytest.mark.parametrize("make", [byte_fallback_bpe, byte_level_bpe])
def test_leading_space_of_first_generated_token(make: Callable[[], Tokenizer]) -> None:
    tok = make()
    prompt, ids = encode(tok, "Hello"), encode(tok, "Hello world")
    assert ids[: len(prompt)] == prompt
    pieces = stream(tok, prompt, ids[len(prompt) :])
    assert pieces[0].startswith(" ") and "".join(pieces) == " world"


def test_special_tokens_stream_their_text_but_final_text_skips_them(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id("</s>") if isinstance(tokenizer, Tokenizer) else tokenizer.eos_token_id
    generated = encode(tokenizer, "Hi there 😀") + [eos]
    pieces = stream(tokenizer, encode(tokenizer, "Q:"), generated)
    assert pieces[-1] == "</s>"
    det = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Q:"), special_ids(tokenizer))
    assert [det.step(t) for t in generated] == pieces
    assert det.text == "".join(pieces[:-1]) and "</s>" not in det.text


def test_window_stays_bounded(tokenizer: Tokenizer) -> None:
    prompt = encode(tokenizer, "A prompt that ends in byte tokens: 漢字")
    ids = encode(tokenizer, " ".join(TEXTS) * 20)
    det = IncrementalDetokenizer(tokenizer, prompt)
    out = []
    for t in ids:
        out.append(det.step(t))
        assert len(det.ids) <= 12
    assert "".join(out) == decode(tokenizer, prompt + ids)[len(decode(tokenizer, prompt)) :]


def test_invalid_bytes_do_not_stall_forever() -> None:
    tok = byte_fallback_bpe()
    lone = tok.token_to_id("<0xF0>")  # a 4-byte lead byte that never completes
    det = IncrementalDetokenizer(tok, [])
    pieces = [det.step(lone) for _ in range(20)]
    assert any(pieces) and len(det.ids) <= 16


def stream_and_final(
    tokenizer: Tokenizer | PreTrainedTokenizerFast, prompt: list[int], generated: list[int]
) -> tuple[list[str], str]:
    """What the engine sends: each token's text (the last one flushing what is held back), and the
    final text."""
    det = IncrementalDetokenizer(tokenizer, prompt, special_ids(tokenizer))
    pieces = [det.step(t) for t in generated]
    pieces[-1] += det.flush()
    return pieces, det.text


@pytest.mark.parametrize("text", TEXTS)
def test_final_text_is_the_joined_stream_without_special_tokens(tokenizer: Tokenizer, text: str) -> None:
    """At every split of prompt and output, with </s> between two characters and at the end, and with
    the output cut short inside a character: the final text equals the streamed texts joined, special
    tokens' texts left out, and the stream is the generated part of the decode of prompt + output."""
    specials = special_ids(tokenizer)
    eos = max(specials - {min(specials)})  # </s>: ids 0, 1, 2 are <unk>, <s>, </s> in every tokenizer here
    ids = encode(tokenizer, "Say:  " + text)
    for k in range(1, len(ids)):
        if not is_boundary(tokenizer, ids, k):  # a prompt is whole text: it ends between characters
            continue
        j = next((j for j in range(k + 1, len(ids)) if is_boundary(tokenizer, ids, j)), len(ids))
        for generated in (ids[k:] + [eos], ids[k:j] + [eos] + ids[j:], ids[k:-1] or ids[k:]):
            pieces, final = stream_and_final(tokenizer, ids[:k], generated)
            kept = "".join(p for p, t in zip(pieces, generated, strict=True) if t not in specials)
            assert final == kept, (k, generated)
            if generated[-1] == eos:  # complete characters only: the stream is the decode's tail
                whole, prompt_text = decode(tokenizer, ids[:k] + generated), decode(tokenizer, ids[:k])
                assert "".join(pieces) == whole[len(prompt_text) :], (k, generated)


def test_sentencepiece_first_token_keeps_its_space(sentencepiece) -> None:
    """With Mistral's tokenizer the stream says ' end  ', and so must the final text (decoding the
    generated ids alone drops the first space)."""
    tok = sentencepiece
    prompt, generated = tok.encode("Say:"), tok.convert_tokens_to_ids(["▁end", "▁▁", "</s>"])
    pieces, final = stream_and_final(tok, prompt, generated)
    assert pieces == [" end", "  ", "</s>"] and final == " end  "
    assert tok.decode(generated, skip_special_tokens=True) == "end  "  # why context matters
    only_bos = stream_and_final(tok, [tok.bos_token_id], generated)  # context that is a special token
    assert only_bos == ([" end", "  ", "</s>"], " end  ")


def test_flush_emits_a_character_cut_short(sentencepiece) -> None:
    tok = sentencepiece
    generated = tok.convert_tokens_to_ids(["😀", "<0xF0>", "<0x9F>"])  # two of 🦙's four bytes
    det = IncrementalDetokenizer(tok, tok.encode("ǅ"), tok.all_special_ids)
    assert [det.step(t) for t in generated] == ["😀", "", ""]
    assert det.flush() == "\ufffd\ufffd" and det.flush() == ""
    assert det.text == "😀\ufffd\ufffd"


def test_a_special_token_carries_only_its_own_text() -> None:
    """Bytes pending when a special token comes (here invalid ones) stream with the next token, not
    with the special token that clients may drop: the final text is then the decode without specials."""
    tok = as_transformers(byte_level_bpe())
    bos, lone = tok.bos_token_id, tok.convert_tokens_to_ids(["Ã", "Ã"])  # two lead bytes, never completed
    generated = [*lone, bos, *encode(tok, "es lo"), tok.eos_token_id]
    det = IncrementalDetokenizer(tok, encode(tok, "1 + 1 ="), tok.all_special_ids)
    pieces = [det.step(t) for t in generated]
    assert pieces[:3] == ["", "", "<s>"] and pieces[3].startswith("\ufffd") and pieces[-1] == "</s>"
    assert det.text == "".join(pieces[:2] + pieces[3:-1]) == tok.decode(generated, skip_special_tokens=True)
