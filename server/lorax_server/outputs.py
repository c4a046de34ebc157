"""What a prefill or decode step hands back per request, and the per-token host work that makes it:
detokenize the chosen token, check the stop conditions, describe it."""

from __future__ import annotations

from dataclasses import dataclass

from .batch import Sequence
from .stopping import FinishReason


@dataclass
class TokenList:
    ids: list[int]
    logprobs: list[float]
    texts: list[str]
    special: list[bool]


@dataclass
class Finished:
    text: str
    generated_tokens: int
    reason: FinishReason
    seed: int | None


@dataclass
class GenerationOut:
    request_id: int
    token_id: int
    logprob: float
    text: str
    special: bool
    prefill: TokenList | None = None
    top_tokens: TokenList | None = None
    finished: Finished | None = None
    skipped: bool = False  # a speculative step's extra token: it took no decode step of its own


@dataclass
class StepTimings:
    """Where the last prefill/decode call spent its time, in nanoseconds."""

    concat_ns: int = 0  # merging batches
    forward_ns: int = 0  # model forward and sampling
    decode_ns: int = 0  # per-request host work: detokenization, stop checks


class Emitter:
    """Turns chosen tokens into `GenerationOut`s (the tokenizer's side of a step)."""

    def __init__(self, tokenizer, special_ids: set[int]) -> None:  # noqa: ANN001 - a transformers tokenizer
        self.tokenizer = tokenizer
        self.special_ids = special_ids

    def token_list(self, ids: list[int], logprobs: list[float]) -> TokenList:
        texts = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        return TokenList(list(ids), logprobs, texts, [i in self.special_ids for i in ids])

    def emit(
        self,
        seq: Sequence,
        token: int,
        logprob: float,
        top: tuple[list[int], list[float]] | None = None,
        skipped: bool = False,
    ) -> GenerationOut:
        """Append `token` to `seq` and describe it; `finished` is set when it ends the request. `top`:
        the step's most likely ids and logprobs for the request's top_n_tokens."""
        seq.generated.append(token)
        text = seq.detokenizer.step(token)
        reason = seq.stopping(token, text)
        if reason is None and seq.matcher is not None and seq.matcher.is_terminated():
            reason = FinishReason.EOS_TOKEN  # the grammar took EOS: it allows nothing more (ignore_eos)
        if reason is not None:  # a character cut short by the end is streamed too (as U+FFFD)
            text += seq.detokenizer.flush()
        gen = GenerationOut(seq.request.id, token, logprob, text, token in self.special_ids, skipped=skipped)
        n = seq.request.top_n_tokens
        if n and top is not None:
            gen.top_tokens = self.token_list(top[0][:n], top[1][:n])
        if reason is not None:
            sampling = seq.request.sampling
            gen.finished = Finished(
                seq.detokenizer.text,  # what the stream sent, special tokens left out
                len(seq.generated),
                reason,
                sampling.seed if sampling.samples else None,
            )
        return gen
