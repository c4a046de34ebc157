"""Streaming detokenization == full decode, on tokenizers built here (no hub)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lorax_server.utils.tokens import IncrementalDetokenizer, decode_generated

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
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, limit_alphabet=60, show_progress=False
    )
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


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback", "byte_level_hf", "byte_fallback_hf"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer | PreTrainedTokenizerFast:
    base = byte_level_bpe() if request.param.startswith("byte_level") else byte_fallback_bpe()
    return as_transformers(base) if request.param.endswith("_hf") else base


def encode(tokenizer: Tokenizer | PreTrainedTokenizerFast, text: str) -> list[int]:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer: Tokenizer | PreTrainedTokenizerFast, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def stream(
    tokenizer: Tokenizer | PreTrainedTokenizerFast, prompt: list[int], generated: list[int]
) -> list[str]:
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
    assert decode_generated(tokenizer, generated) == tokenizer.decode(generated[:-1])
    assert "</s>" not in decode_generated(tokenizer, generated)


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
