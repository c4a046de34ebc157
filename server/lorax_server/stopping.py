"""Per-request stop criteria: end-of-sequence tokens, stop sequences and the max_new_tokens budget."""

from __future__ import annotations

import enum


class FinishReason(enum.IntEnum):
    """Why a request finished; the values equal proto FinishReason."""

    LENGTH = 0
    EOS_TOKEN = 1
    STOP_SEQUENCE = 2


class StoppingCriteria:
    """Called once per generated token, in order; says whether (and why) the request is done.

    On one token EOS wins over a stop sequence, which wins over the length budget. Stop sequences
    are matched against the streamed text of the generated tokens, so they may span token
    boundaries or lie inside one token's text. Only the last `longest stop - 1` characters are kept
    between calls: enough to complete any match that the next text could finish.
    """

    def __init__(
        self, eos_token_ids: set[int], max_new_tokens: int, stop_sequences: list[str], ignore_eos: bool
    ) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_new_tokens = max_new_tokens
        self.stop_sequences = [s for s in stop_sequences if s]
        self.ignore_eos = ignore_eos
        self.current_tokens = 0
        self._tail = ""
        self._keep = max((len(s) for s in self.stop_sequences), default=1) - 1

    def __call__(self, token_id: int, new_text: str) -> FinishReason | None:
        """Account for one generated token whose streamed text is `new_text`."""
        self.current_tokens += 1
        if not self.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if self.stop_sequences and new_text:
            text = self._tail + new_text
            if any(s in text for s in self.stop_sequences):
                return FinishReason.STOP_SEQUENCE
            self._tail = text[-self._keep :] if self._keep else ""
        if self.current_tokens >= self.max_new_tokens:
            return FinishReason.LENGTH
        return None
