"""Green-list watermarking (Kirchenbauer et al., "A Watermark for Large Language Models", 2023), the way
TGI and LoRAX do it, so that their detectors recognise this server's text.

A request with `watermark: true` has `delta` added to the logits of a `gamma` share of the vocabulary
before any other processor runs: its green list, the first `int(vocab * gamma)` tokens of a permutation
of the vocabulary that torch's generator (on the logits' device) draws when seeded with HASH_KEY times
the previous token. Sampling then favours green tokens, and a detector that knows the key counts them.
`gamma` and `delta` come from WATERMARK_GAMMA and WATERMARK_DELTA (LoRAX's launcher flags
`--watermark-gamma`, `--watermark-delta`), 0.5 and 2.0 by default.

The seed needs each watermarked row's previous token on the host, and the permutation is drawn row by
row: one small device-to-host read and a loop over the watermarked rows only, in steps that have some.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

HASH_KEY = 15485863  # the paper's prime, which TGI's and LoRAX's detectors seed with


@dataclass(frozen=True)
class WatermarkSettings:
    gamma: float = 0.5  # share of the vocabulary on the green list
    delta: float = 2.0  # added to the green tokens' logits

    @classmethod
    def from_env(cls) -> WatermarkSettings:
        """From WATERMARK_GAMMA and WATERMARK_DELTA; ValueError naming the variable for a bad value."""
        values = {}
        for name, default in (("WATERMARK_GAMMA", cls.gamma), ("WATERMARK_DELTA", cls.delta)):
            text = os.environ.get(name, "").strip()
            try:
                values[name] = float(text) if text else default
            except ValueError:
                values[name] = math.nan
        gamma, delta = values["WATERMARK_GAMMA"], values["WATERMARK_DELTA"]
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"WATERMARK_GAMMA must be a number in (0, 1) (got {os.environ['WATERMARK_GAMMA']!r})")
        if not (math.isfinite(delta) and delta >= 0.0):
            raise ValueError(f"WATERMARK_DELTA must be a finite number >= 0 (got {os.environ['WATERMARK_DELTA']!r})")
        return cls(gamma, delta)


@functools.cache
def settings() -> WatermarkSettings:
    """The shard's settings, read once (the shard checks them at start)."""
    return WatermarkSettings.from_env()


def greenlist(previous_token: int, vocab: int, gamma: float, device: torch.device) -> torch.Tensor:
    """The green token ids after `previous_token`: [int(vocab * gamma)] int64."""
    generator = torch.Generator(device=device)
    generator.manual_seed(HASH_KEY * previous_token)
    return torch.randperm(vocab, generator=generator, device=device)[: int(vocab * gamma)]


def apply_watermark(
    scores: torch.Tensor, history: torch.Tensor, rows: list[int], config: WatermarkSettings
) -> torch.Tensor:
    """Add `config.delta` to the green tokens of each row of `rows` (in place; returns `scores`).

    scores: [batch, vocab] float32; history: [batch, max_len] int64 tokens seen so far (prompt and
    generated), padded with -1 after them: each row's last token seeds its green list."""
    index = torch.tensor(rows, dtype=torch.int64, device=history.device)
    seen = history.index_select(0, index)
    last = ((seen >= 0).sum(dim=1) - 1).clamp(min=0)
    previous = seen.gather(1, last[:, None]).squeeze(1).tolist()  # the seeds are host integers
    vocab = scores.shape[-1]
    for row, token in zip(rows, previous, strict=True):
        scores[row, greenlist(token, vocab, config.gamma, scores.device)] += config.delta
    return scores
