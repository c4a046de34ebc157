"""Batched next-token choice: logits processors and seeded sampling for a whole batch in one pass.

Processing order and semantics follow transformers (and TGI): the watermark's green-list bias
(`watermark`, for the rows that ask for it), repetition penalty, OpenAI's frequency
and presence penalties (over generated tokens), then for sampling rows temperature, top-k, top-p and
typical-p (filtered scores become -inf, at least one token is
always kept), then log-softmax and the choice: greedy rows take the arg-max, sampling rows draw from
softmax(processed scores). Each per-request parameter is a per-row tensor, so one batch mixes any
parameters without a Python loop over rows. Which stages run at all is decided once per batch
composition (from_params / filter / concatenate), never by a host sync in the step.

Sampling is Gumbel-max with noise from a counter-based hash of (seed, step, token id) made with
integer tensor ops, so a request's draws depend only on its own seed and step: the same in any batch,
at any row, on CPU and CUDA alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import watermark
from .watermark import apply_watermark

_MASK32 = 0xFFFFFFFF
# Multipliers of a two-round xorshift-multiply mixer (murmur3 fmix32 family), and Weyl increments that
# spread consecutive counters apart. Tensors hold the 32-bit words as int32 whose products wrap
# modulo 2**32, so the tensor mixer equals the Python-int one bit for bit on every device.
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_WEYL = 0x9E3779B9
_STEP_WEYL = 0x7F4A7C15


def _signed32(x: int) -> int:
    """The int32 with the same bits as the 32-bit word x."""
    x &= _MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


def _mix32(x: int) -> int:
    """The 32-bit mixer on a Python int in [0, 2**32) (reference for `_mix32_`)."""
    x ^= x >> 16
    x = (x * _MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 15)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` in place on an int32 tensor of 32-bit words (right shifts made logical by masking)."""
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))
    x.mul_(_MUL1)
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF))
    x.mul_(_MUL2)
    return x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF))


def seed_key(seed: int) -> int:
    """The int32 key of a uint64 seed (both halves mixed in)."""
    seed %= 1 << 64
    return _signed32(_mix32(_mix32(seed & _MASK32) ^ (seed >> 32)))


def random_bits(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Counter-based 32-bit words, one per (seed key, step, token id), independent of the batch.

    keys: [n] int32 from `seed_key`; steps: [n] int64. Returns [n, vocab] int32. Word (i, v) is
    mix(mix(key_i + step_i * STEP_WEYL) + v * WEYL), all mod 2**32.
    """
    low = steps & _MASK32
    step32 = torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)  # [n], exact conversion
    step_key = _mix32_(keys.to(torch.int32) + step32 * _signed32(_STEP_WEYL))  # [n]
    ids = torch.arange(vocab, dtype=torch.int32, device=keys.device).mul_(_signed32(_WEYL))  # [vocab]
    return _mix32_(step_key[:, None] + ids)  # [n, vocab]


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [n, vocab] float32 for seed keys [n] int32 at steps [n] int64."""
    bits = random_bits(keys, steps, vocab)
    # Top 23 bits m -> u = (2m + 1) / 2**24: exact in float32, never 0 or 1.
    u = (bits >> 9).bitwise_and_(0x7FFFFF).to(torch.float32).mul_(2.0).add_(1.0).mul_(2.0**-24)
    return u.log_().neg_().log_().neg_()


@dataclass(frozen=True)
class SamplingParams:
    """One request's next-token parameters (mirrors proto NextTokenChooserParameters).

    Normalisation: a row samples only if `do_sample` and `temperature > 0` (temperature 0 means greedy);
    the warpers apply to sampling rows only; top_k <= 0, top_p >= 1, typical_p outside (0, 1) and
    repetition_penalty <= 0 or == 1 are disabled; frequency/presence penalties of 0 are disabled.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    watermark: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @classmethod
    def from_proto(cls, p: Any) -> SamplingParams:
        """From a generate_pb2.NextTokenChooserParameters (or anything with the same fields)."""
        return cls(
            temperature=float(p.temperature),
            top_k=int(p.top_k),
            top_p=float(p.top_p),
            typical_p=float(p.typical_p),
            do_sample=bool(p.do_sample),
            seed=int(p.seed),
            repetition_penalty=float(p.repetition_penalty),
            watermark=bool(p.watermark),
            frequency_penalty=float(p.frequency_penalty),
            presence_penalty=float(p.presence_penalty),
        )

    @property
    def samples(self) -> bool:
        """Whether this request samples (else it takes the arg-max)."""
        return self.do_sample and self.temperature > 0


@dataclass
class SamplerOutput:
    next_ids: torch.Tensor  # [batch] int64
    logprobs: torch.Tensor  # [batch, vocab] float32, log_softmax of the processed scores

    def chosen_logprobs(self) -> torch.Tensor:
        """Log-probability of each row's chosen token: [batch]."""
        return self.logprobs.gather(1, self.next_ids[:, None]).squeeze(1)

    def top_n(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n most likely tokens per row: ([batch, n] int64 ids, [batch, n] logprobs), best first.

        Filtered tokens have logprob -inf; n is capped at the vocabulary size.
        """
        values, ids = self.logprobs.topk(min(n, self.logprobs.shape[-1]), dim=-1)
        return ids, values


class BatchSampler:
    """Per-row parameter tensors of one batch, and the batched processors that use them."""

    def __init__(self, params: list[SamplingParams], device: torch.device) -> None:
        self.params = list(params)
        self.device = torch.device(device)
        sample = [p.samples for p in params]
        # Temperature and repetition penalty divide or multiply the logits: extreme values (the API
        # takes any positive number) are held where float32 stays finite, since an infinite score
        # makes log_softmax NaN. Beyond these bounds the result is the same choice anyway.
        temperature = [_finite_scale(p.temperature) if s else 1.0 for p, s in zip(params, sample, strict=True)]
        top_k = [max(p.top_k, 0) if s else 0 for p, s in zip(params, sample, strict=True)]
        top_p_on = [s and p.top_p < 1.0 for p, s in zip(params, sample, strict=True)]
        typical_on = [s and 0.0 < p.typical_p < 1.0 for p, s in zip(params, sample, strict=True)]
        penalty = [_finite_scale(p.repetition_penalty) if p.repetition_penalty > 0 else 1.0 for p in params]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        self.do_sample = tensor(sample, torch.bool)  # [batch]
        self.temperature = tensor(temperature, torch.float32)  # [batch]
        self.top_k = tensor(top_k, torch.int64)  # [batch], 0 = off
        # 1 - top_p in double precision, then float32: the scalar transformers compares against.
        self.top_p_cut = tensor([1.0 - p.top_p for p in params], torch.float32)  # [batch]
        self.top_p_on = tensor(top_p_on, torch.bool)  # [batch]
        self.typical_mass = tensor([p.typical_p for p in params], torch.float32)  # [batch]
        self.typical_on = tensor(typical_on, torch.bool)  # [batch]
        self.penalty = tensor(penalty, torch.float32)  # [batch]
        self.seed_keys = tensor([seed_key(p.seed) for p in params], torch.int32)  # [batch]
        self.frequency = tensor([p.frequency_penalty for p in params], torch.float32)  # [batch]
        self.presence = tensor([p.presence_penalty for p in params], torch.float32)  # [batch]

        # Host-side flags: which stages this batch needs.
        self.any_sample = any(sample)
        self.all_sample = bool(params) and all(sample)
        self.any_penalty = any(x != 1.0 for x in penalty)
        self.any_count_penalty = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
        self.any_temperature = any(x != 1.0 for x in temperature)
        self.max_top_k = max(top_k, default=0)
        self.watermark_rows = [i for i, p in enumerate(params) if p.watermark]  # host list: rarely any
        self.any_top_p = any(top_p_on)
        self.any_typical = any(typical_on)
        rows = [i for i, s in enumerate(sample) if s]
        self.sample_rows = tensor(rows, torch.int64)  # [n_sample]
        self.sample_keys = self.seed_keys[self.sample_rows]  # [n_sample]

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device) -> BatchSampler:
        return cls(params, device)

    def __len__(self) -> int:
        return len(self.params)

    def filter(self, keep: torch.Tensor | Sequence[int]) -> BatchSampler:
        """The sampler of the rows `keep` ([new_batch] int64 row indices), in that order."""
        rows = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
        return BatchSampler([self.params[i] for i in rows], self.device)

    _ROW_TENSORS = (
        "do_sample", "temperature", "top_k", "top_p_cut", "top_p_on", "typical_mass", "typical_on",
        "penalty", "seed_keys", "frequency", "presence",
    )  # fmt: skip

    def expand(self, rows: torch.Tensor, repeats: list[int]) -> BatchSampler:
        """The sampler of a batch where row i appears `repeats[i]` times in a row (`rows`: [sum] int64,
        its row indices, on the device), made by indexing this one's tensors: the stages, which a
        batch's rows decide, stay as they are."""
        new = object.__new__(BatchSampler)
        new.__dict__.update(self.__dict__)
        new.params = [p for p, n in zip(self.params, repeats, strict=True) for _ in range(n)]
        for name in self._ROW_TENSORS:
            setattr(new, name, getattr(self, name)[rows])
        sample_rows = [i for i, p in enumerate(new.params) if p.samples]
        new.watermark_rows = [i for i, p in enumerate(new.params) if p.watermark]
        new.sample_rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        new.sample_keys = new.seed_keys[new.sample_rows]
        return new

    @property
    def row_independent(self) -> bool:
        """Whether every row takes the arg-max of its logits untouched (greedy, no processor): then
        the choice needs no per-row state, and any number of logit rows can be passed."""
        plain = not (self.any_sample or self.any_penalty or self.any_count_penalty or self.any_temperature)
        return plain and self.max_top_k == 0 and not (self.any_top_p or self.any_typical or self.watermark_rows)

    @property
    def uses_history(self) -> bool:
        """Whether a stage reads the tokens seen so far (the penalties, and the watermark's seed)."""
        return self.any_penalty or self.any_count_penalty or bool(self.watermark_rows)

    @classmethod
    def concatenate(cls, samplers: list[BatchSampler]) -> BatchSampler:
        """One sampler whose rows are the samplers' rows, in order."""
        if not samplers:
            raise ValueError("concatenate needs at least one sampler")
        params = [p for s in samplers for p in s.params]
        return cls(params, samplers[0].device)

    def process(
        self,
        logits: torch.Tensor,
        history: torch.Tensor,
        prompt_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Processed scores [batch, vocab] float32 of logits [batch, vocab] given history [batch, max_len]
        (prompt_lens [batch] int64: where each row's generated tokens start; needed by the frequency and
        presence penalties). Constrained rows come with their disallowed tokens at -inf already, which
        every stage keeps at -inf (the warpers then renormalise over allowed tokens only)."""
        scores = logits.float()
        if self.watermark_rows:  # first, as TGI and LoRAX do: their detectors count the green tokens
            scores = apply_watermark(scores.clone() if scores is logits else scores, history, self.watermark_rows,
                                     watermark.settings())  # fmt: skip
        if self.any_penalty and history.shape[1] > 0:
            scores = apply_repetition_penalty(scores, history, self.penalty)
        if self.any_count_penalty and history.shape[1] > 0:
            if prompt_lens is None:
                raise ValueError("frequency and presence penalties need the prompt lengths")
            scores = apply_count_penalties(scores, history, prompt_lens, self.frequency, self.presence)
        if self.any_temperature:
            scores = scores / self.temperature[:, None]
        if self.max_top_k > 0:
            scores = apply_top_k(scores, self.top_k, self.max_top_k)
        if self.any_top_p:
            scores = apply_top_p(scores, self.top_p_cut, self.top_p_on)
        if self.any_typical:
            scores = apply_typical(scores, self.typical_mass, self.typical_on)
        return scores

    def __call__(
        self,
        logits: torch.Tensor,
        history: torch.Tensor,
        steps: torch.Tensor,
        prompt_lens: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Choose the next token of every row.

        logits: [batch, vocab]; history: [batch, max_len] int64 ids seen so far (prompt + generated),
        padded with -1; steps: [batch] int64 tokens generated so far (the random stream's counter);
        prompt_lens: [batch] int64.
        """
        scores = self.process(logits, history, prompt_lens)  # [batch, vocab]
        logprobs = torch.log_softmax(scores, dim=-1)
        vocab = scores.shape[-1]
        if self.all_sample:
            next_ids = (scores + gumbel_noise(self.seed_keys, steps, vocab)).argmax(dim=-1)
        elif self.any_sample:
            rows = self.sample_rows
            noise = gumbel_noise(self.sample_keys, steps[rows], vocab)  # [n_sample, vocab]
            sampled = (scores[rows] + noise).argmax(dim=-1)
            next_ids = scores.argmax(dim=-1).index_copy_(0, rows, sampled)
        else:
            next_ids = scores.argmax(dim=-1)
        return SamplerOutput(next_ids=next_ids, logprobs=logprobs)


# Logits stay well within ±1e4, so scaling them by both factors (penalty, then temperature) in this
# range stays far from float32's largest value (3.4e38): 1e4 · 1e15 · 1e15 = 1e34.
_SCALE_MIN, _SCALE_MAX = 1e-15, 1e15


def _finite_scale(value: float) -> float:
    """A temperature or repetition penalty held within [_SCALE_MIN, _SCALE_MAX]."""
    return min(max(value, _SCALE_MIN), _SCALE_MAX)


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor per row.

    scores: [batch, vocab]; history: [batch, max_len] int64, -1 = padding; penalty: [batch].
    Ids outside the vocabulary (padding, or an embedding larger than the head) go to a spare column.
    """
    vocab = scores.shape[-1]
    ids = torch.where(history < 0, vocab, history.clamp(max=vocab))  # [batch, max_len]
    padded = torch.nn.functional.pad(scores, (0, 1))  # [batch, vocab + 1]
    seen = padded.gather(1, ids)
    pen = penalty[:, None]
    seen = torch.where(seen < 0, seen * pen, seen / pen)
    return padded.scatter(1, ids, seen)[:, :vocab]


def apply_count_penalties(
    scores: torch.Tensor,
    history: torch.Tensor,
    prompt_lens: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """OpenAI's penalties per row: scores - frequency·count - presence·[count > 0], where count is
    how often the token was generated so far (prompt tokens do not count).

    scores: [batch, vocab]; history: [batch, max_len] int64, -1 = padding; prompt_lens: [batch];
    frequency, presence: [batch]. Ids outside the vocabulary go to a spare column.
    """
    batch, vocab = scores.shape
    positions = torch.arange(history.shape[1], device=history.device)
    generated = (positions[None, :] >= prompt_lens[:, None]) & (history >= 0)  # [batch, max_len]
    ids = torch.where(generated, history.clamp(max=vocab), vocab)
    counts = scores.new_zeros(batch, vocab + 1).scatter_add_(1, ids, generated.to(scores.dtype))[:, :vocab]
    return scores - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(scores.dtype)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """transformers' TopKLogitsWarper per row; scores [batch, vocab], top_k [batch] (0 = off)."""
    vocab = scores.shape[-1]
    k = top_k.clamp(max=vocab)  # [batch]
    top_values = scores.topk(min(max_top_k, vocab), dim=-1).values  # [batch, max_k], descending
    kth = top_values.gather(1, (k - 1).clamp(min=0)[:, None])  # [batch, 1]
    kth = kth.masked_fill(k[:, None] <= 0, float("-inf"))
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, cut: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """transformers' TopPLogitsWarper per row; scores [batch, vocab], cut = 1 - top_p [batch], on [batch]."""
    sorted_logits, sorted_ids = scores.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= cut[:, None]
    remove[:, -1] = False  # min_tokens_to_keep = 1
    remove &= on[:, None]
    return scores.masked_fill(remove.scatter(1, sorted_ids, remove), float("-inf"))


def apply_typical(scores: torch.Tensor, mass: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """transformers' TypicalLogitsWarper per row; scores [batch, vocab], mass [batch], on [batch]."""
    normalized = torch.log_softmax(scores, dim=-1)
    p = normalized.exp()
    entropy = -(normalized * p).nansum(-1, keepdim=True)  # [batch, 1]
    shifted = (-normalized - entropy).abs()
    sorted_shifted, sorted_ids = shifted.sort(dim=-1)
    cumulative = scores.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=1).clamp_(max=scores.shape[-1] - 1)  # [batch]
    remove = sorted_shifted > sorted_shifted.gather(1, last[:, None])
    remove[:, 0] = False  # min_tokens_to_keep = 1
    remove &= on[:, None]
    return scores.masked_fill(remove.scatter(1, sorted_ids, remove), float("-inf"))
