"""Incremental detokenization for streaming, and the final text of a generation.

The generated ids are read in the context of the prompt's last tokens, and the final text is what
the streamed token texts add up to, special tokens' texts left out. Decoding the generated ids alone
would differ with SentencePiece tokenizers (Llama, Mistral, Gemma): their decoder strips the first
token's leading space, so a stream of `' end'`, `'  '` would end as `'end  '`. Decoding them all at
once would differ too when a run of byte-fallback pieces ends in an incomplete character: the decoder
then turns the whole run into U+FFFD, while the stream already sent the complete characters.

The tokenizer is anything with `decode(ids, skip_special_tokens=...)`: a transformers fast tokenizer
(PreTrainedTokenizerFast / TokenizersBackend, what the engine loads) or a bare `tokenizers.Tokenizer`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

# At most this many prompt tokens are decoded before the first generated one, so that its text is read
# in context (a SentencePiece "▁word" keeps its space after a prompt, as in TGI / LoRAX streams).
PROMPT_CONTEXT = 5
# Past this many pending tokens the text is emitted even if it still ends in U+FFFD (invalid bytes
# from the model, or a genuine U+FFFD); a UTF-8 character spans at most 4 byte tokens.
MAX_PENDING = 8


class IncrementalDetokenizer:
    """Text of one sequence's generated tokens, one token at a time, and the final text.

    Prefix/read-offset technique: decode the window of recent ids from `prefix_offset`, once with
    and once without the tokens not yet emitted, and emit the new suffix. While the window's text
    ends in U+FFFD (a multi-byte character still incomplete) nothing is emitted; the whole character
    comes with the token that completes it. Concatenated step() texts, then flush(), are the generated
    part of decode(context + generated), special tokens included, where `context` is the prompt's
    last tokens (from a character boundary); with an empty prompt that is exactly decode(generated).
    Tokens of `special_ids` stream their own text and stay out of the window; `text` is the stream
    without them. Only the window of ids is kept.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], special_ids: Collection[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(special_ids)
        prompt = [int(i) for i in prompt_ids[max(len(prompt_ids) - PROMPT_CONTEXT, 0) :]]
        # Start the context on a character boundary: a window opening inside a multi-byte character
        # decodes to U+FFFD, and a byte-fallback decoder then garbles the whole run of byte tokens.
        start = 0
        while start < len(prompt) and self._decode(prompt[start:]).startswith("\ufffd"):
            start += 1
        self.ids = prompt[start:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._prefix_text: str | None = None
        self._kept: list[str] = []  # emitted texts but those of special tokens: the final text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    @property
    def text(self) -> str:
        """The generation's final text so far: every emitted text but those of special tokens."""
        return "".join(self._kept)

    def step(self, token_id: int) -> str:
        """Text added by this token: "" while a character is incomplete, then the whole character."""
        token_id = int(token_id)
        if token_id in self.special_ids:
            # Its own text, kept out of the window: text still pending before it stays pending and
            # comes with the next token, so a special token (which clients may drop) carries no other.
            return self._decode([token_id])
        self.ids.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        prefix_text = self._prefix_text
        new_text = self._decode(self.ids[self.prefix_offset :])
        pending = len(self.ids) - self.read_offset
        complete = len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")
        if not complete and pending < MAX_PENDING:
            return ""
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """Text of the tokens still held back (an incomplete character, as U+FFFD), for the last
        token of a sequence: the stream then adds up to the whole decode."""
        if len(self.ids) == self.read_offset:
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return self._emit(self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :])

    def _emit(self, text: str) -> str:
        self._kept.append(text)
        # The emitted tokens become the next window's prefix; older ids are dropped.
        del self.ids[: self.read_offset]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self._prefix_text = None
        return text
