"""Incremental detokenization for streaming, and the final text of a generation.

The tokenizer is anything with `decode(ids, skip_special_tokens=...)`: a transformers fast tokenizer
(PreTrainedTokenizerFast / TokenizersBackend, what the engine loads) or a bare `tokenizers.Tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# At most this many prompt tokens are decoded before the first generated one, so that its text is read
# in context (a SentencePiece "▁word" keeps its space after a prompt, as in TGI / LoRAX streams).
PROMPT_CONTEXT = 5
# Past this many pending tokens the text is emitted even if it still ends in U+FFFD (invalid bytes
# from the model, or a genuine U+FFFD); a UTF-8 character spans at most 4 byte tokens.
MAX_PENDING = 8


class IncrementalDetokenizer:
    """Text of one sequence's generated tokens, one token at a time.

    Prefix/read-offset technique: decode the window of recent ids from `prefix_offset`, once with
    and once without the tokens not yet emitted, and emit the new suffix. While the window's text
    ends in U+FFFD (a multi-byte character still incomplete) nothing is emitted; the whole character
    comes with the token that completes it. Concatenated step() texts are the generated part of
    decode(prompt + generated), special tokens included; with an empty prompt that is exactly
    decode(generated). Only the window of ids is kept, not the history.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def step(self, token_id: int) -> str:
        """Text added by this token: "" while a character is incomplete, then the whole character."""
        self.ids.append(int(token_id))
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        prefix_text = self._prefix_text
        new_text = self._decode(self.ids[self.prefix_offset :])
        pending = len(self.ids) - self.read_offset
        complete = len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")
        if not complete and pending < MAX_PENDING:
            return ""
        # The emitted tokens become the next window's prefix; older ids are dropped.
        del self.ids[: self.read_offset]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self._prefix_text = None
        return new_text[len(prefix_text) :]


def decode_generated(tokenizer: Any, ids: Sequence[int]) -> str:
    """Final text of a generation: decode of all generated ids at once, special tokens skipped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)
