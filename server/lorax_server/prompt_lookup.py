"""Prompt lookup on the host: where each run of a sequence's last few ids last occurred before.

A sequence's index maps every run of 1..max_ngram consecutive ids to the position where its most
recent occurrence ends, and grows with the sequence: a step adds the few ids it emitted, so a lookup
costs a handful of dictionary reads whatever the prompt's length (the prompt itself is indexed once,
at the sequence's first lookup). The ids are on the host already (the emitter appends each token to
its sequence), so drafting needs no device-to-host copy before the step's inputs are known.
"""

from __future__ import annotations


class NgramIndex:
    """The most recent end of every run of 1..max_ngram ids of one sequence (prompt, then output)."""

    def __init__(self, prompt: list[int], max_ngram: int) -> None:
        self.ids = list(prompt)
        self.prompt_len = len(prompt)
        self.max_ngram = max_ngram
        self.last_end: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # runs ending before this position are in `last_end`

    def propose(self, generated: list[int], k: int) -> tuple[list[int], int]:
        """Up to k ids that followed the most recent earlier occurrence of the sequence's last n ids,
        for the longest n (max_ngram down to 1) that occurred before with a known continuation; and
        that n (0 and no ids when nothing matched). `generated`: the sequence's output so far."""
        ids = self.ids
        ids += generated[len(ids) - self.prompt_len :]
        length = len(ids)
        # A match must end before the last id, so that at least one id after it is known.
        last_end, most = self.last_end, self.max_ngram
        for end in range(self.indexed, length - 1):
            for n in range(1, min(most, end + 1) + 1):
                last_end[tuple(ids[end - n + 1 : end + 1])] = end
        self.indexed = max(self.indexed, length - 1)
        for n in range(min(most, length), 0, -1):
            end = last_end.get(tuple(ids[length - n :]))
            if end is not None:
                return ids[end + 1 : end + 1 + k], n
        return [], 0
