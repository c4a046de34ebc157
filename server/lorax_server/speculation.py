"""Speculative decoding: draft a row's next tokens, feed the row's next token and its drafts through
one forward pass over the paged cache, and keep the longest prefix of the drafts that the row's own
sampling would have produced, plus the token sampled after it. Drafts come from prompt lookup (copy
what followed the most recent earlier occurrence of the row's last few tokens, in its prompt or its
output) or, for rows whose adapter has them, from Medusa heads (`adapters.medusa`), which guess on from
the final hidden state of the row's last kept token.

The output is the one plain decoding gives: position i of a row is sampled from its logits with the
history and random-stream step it would have had (its drafts up to i, which are the tokens it chose
if they are kept), so greedy, seeded sampling and every penalty choose the same tokens. Keys and
values written for drafts that are not kept sit beyond the row's context, unread, until the next
step overwrites them: nothing is rolled back. A row never drafts past its `max_new_tokens` (its
blocks hold prompt + max_new_tokens), and rows under a grammar never draft (their matcher moves one
token at a time).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapters.lora import segments_of
from .adapters.manager import AdapterManager
from .adapters.medusa import MedusaHeads
from .batch import Batch, Sequence
from .forward import ForwardBatch
from .grammar import TokenMasks, advance
from .kv_cache import KVCache
from .models.transformer import CausalLM
from .outputs import Emitter, GenerationOut, StepTimings
from .prompt_lookup import NgramIndex
from .sampling import BatchSampler, SamplerOutput


@dataclass(frozen=True)
class SpeculationConfig:
    tokens: int = 0  # most drafted tokens per row and step (0: off)
    max_batch_size: int = 32  # most tokens a step feeds with drafts: larger batches draft nothing
    max_ngram: int = 3  # longest run of last tokens looked up (shorter runs are tried next)

    @property
    def enabled(self) -> bool:
        return self.tokens > 0


def draft_caps(
    lengths: list[int], remaining: list[int], constrained: list[bool], k: int, length_dependent_above: int | None
) -> list[int]:
    """Most drafts each row may take: none past its max_new_tokens (the last token a row may emit is
    the one sampled after its drafts), none under a grammar, and none that would take the row past a
    length where the model's rotary frequencies start to depend on the length itself (their keys are
    only exact when each token is computed at its own length)."""
    caps = []
    for length, left, grammar in zip(lengths, remaining, constrained, strict=True):
        cap = 0 if grammar else min(k, left - 1)
        if length_dependent_above is not None:
            cap = min(cap, length_dependent_above - length)
        caps.append(max(cap, 0))
    return caps


def next_draft_limit(limit: int, drafted: int, kept: int, k: int) -> int:
    """A row's draft limit after a step: one more after every draft was kept, as many as were kept
    otherwise (so a row whose drafts its model keeps refusing stops paying for them)."""
    if drafted == 0:
        return limit
    return min(k, kept + 1) if kept == drafted else kept


def row_drafts(known: int, matched: int, cap: int, limit: int, max_ngram: int) -> int:
    """How many of its looked-up drafts a row feeds: within its cap and its draft limit, except that a
    row at limit 0 tries one draft again when its last `max_ngram` ids match (the strongest evidence)."""
    if limit == 0 and matched == max_ngram:
        limit = 1
    return min(known, cap, limit)


def within_budget(counts: list[int], matched: list[int], budget: int) -> list[int]:
    """The rows' draft counts cut to `budget` drafts in all, rows with the longest matches served
    first: a step feeds at most max_batch_size tokens, drafts included (decode steps over more tokens
    are compute-bound, where a refused draft costs about as much as a row)."""
    if sum(counts) <= budget:
        return counts
    out = [0] * len(counts)
    for row in sorted(range(len(counts)), key=lambda r: -matched[r]):
        out[row] = min(counts[row], max(budget, 0))
        budget -= out[row]
    return out


@dataclass
class Drafted:
    """A decode step's input when rows carry drafts: each row's next token then its drafts."""

    ids: torch.Tensor  # [tokens] int64
    query_lens: list[int]  # 1 + drafts, per row
    first: list[int]  # where each row's tokens start in `ids`
    drafts: torch.Tensor  # [rows, k] int64
    counts: torch.Tensor  # [rows] int64

    @classmethod
    def build(cls, last: list[int], grid: list[list[int]], counts: list[int], device: torch.device) -> Drafted:
        """From host lists: each row's last known id, its drafts (a row of `grid`, k long) and how many
        of them it feeds; one copy to the device."""
        k = len(grid[0])
        fed = [t for row, c in enumerate(counts) for t in (last[row], *grid[row][:c])]
        flat = torch.tensor(fed + [t for r in grid for t in r] + counts, dtype=torch.int64).to(device)
        query_lens = [1 + c for c in counts]
        first = list(itertools.accumulate(query_lens, initial=0))[:-1]
        n, rows = len(fed), len(grid)
        drafts = flat[n : n + rows * k].view(rows, k)
        return cls(flat[:n], query_lens, first, drafts, flat[n + rows * k :])


@dataclass
class Verified:
    """What each row keeps of a drafted step, as [rows, k + 1] grids by offset (offsets past a row's
    drafts hold -1 / 0): the token chosen at each offset and its logprob, the drafts accepted, and the
    sampler output over every fed token (for top-n alternatives)."""

    tokens: torch.Tensor  # [rows, k + 1] int64
    logprobs: torch.Tensor  # [rows, k + 1] float32
    accepted: torch.Tensor  # [rows] int64: drafts kept; the row emits accepted + 1 tokens
    out: SamplerOutput  # over the fed tokens, row-major


def expanded_history(
    history: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, drafts: torch.Tensor
) -> torch.Tensor:
    """Each fed token's history: its row's, followed by the row's drafts before it ([tokens, width])."""
    k = drafts.shape[1]
    width = history.shape[1]
    grown = F.pad(history[rows], (0, k), value=-1)  # drafts may run past a short row's width
    cols = lengths[rows][:, None] + torch.arange(k, device=history.device)  # [tokens, k]
    before = torch.arange(k, device=history.device)[None, :] < offsets[:, None]
    grown.scatter_(1, cols, torch.where(before, drafts[rows], grown.gather(1, cols)))
    return grown[:, :width]


def verify(
    sampler: BatchSampler,
    logits: torch.Tensor,
    history: torch.Tensor,
    steps: torch.Tensor,
    prompt_lens: torch.Tensor,
    lengths: torch.Tensor,
    drafted: Drafted,
) -> Verified:
    """Sample every fed token as plain decoding would at its offset, and accept each row's drafts up to
    the first one its sampling disagrees with. `logits` are [tokens, vocab], masked already for rows
    under a grammar (which feed one token)."""
    device = logits.device
    num_rows, k = drafted.drafts.shape
    # Each fed token's row, offset in its row and cell in the [rows, k + 1] grids: host lists (the
    # step's shape is on the host already), one copy to the device.
    rows_host = [r for r, n in enumerate(drafted.query_lens) for _ in range(n)]
    offsets_host = [i for n in drafted.query_lens for i in range(n)]
    index = torch.tensor([rows_host, offsets_host], dtype=torch.int64).to(device, non_blocking=True)
    rows, offsets = index[0], index[1]
    if sampler.row_independent:  # greedy and unprocessed: each fed token's choice needs no row state
        out = sampler(logits, history[:0], steps[:0])
    else:
        expanded = sampler.expand(rows, drafted.query_lens)
        fed = history[rows]
        if expanded.uses_history:
            fed = expanded_history(history, rows, offsets, lengths, drafted.drafts)
        out = expanded(logits, fed, steps[rows] + offsets, prompt_lens[rows])
    cell = rows * (k + 1) + offsets
    tokens = torch.full((num_rows * (k + 1),), -1, dtype=torch.int64, device=device)
    tokens = tokens.index_copy_(0, cell, out.next_ids).view(num_rows, k + 1)
    logprobs = torch.zeros(num_rows * (k + 1), dtype=torch.float32, device=device)
    logprobs = logprobs.index_copy_(0, cell, out.chosen_logprobs().float()).view(num_rows, k + 1)
    agree = (tokens[:, :k] == drafted.drafts) & (torch.arange(k, device=device)[None, :] < drafted.counts[:, None])
    accepted = agree.long().cumprod(1).sum(1)
    return Verified(tokens, logprobs, accepted, out)


def advance_rows(history: torch.Tensor, lengths: torch.Tensor, verified: Verified) -> torch.Tensor:
    """The rows' histories with their kept tokens written after their known ones."""
    k1 = verified.tokens.shape[1]
    width = history.shape[1]
    grown = F.pad(history, (0, k1), value=-1)
    cols = lengths[:, None] + torch.arange(k1, device=history.device)
    keep = torch.arange(k1, device=history.device)[None, :] <= verified.accepted[:, None]
    grown.scatter_(1, cols, torch.where(keep, verified.tokens, grown.gather(1, cols)))
    return grown[:, :width].contiguous()


def medusa_guesses(
    heads: list[MedusaHeads | None],
    hidden: torch.Tensor,
    first: list[int],
    accepted: torch.Tensor,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """[rows, most heads] int64: each row's heads' guesses from the final hidden state of its last kept
    position (zeros for rows without heads); one call per distinct set of heads."""
    k = max(h.num_heads for h in heads if h is not None)
    out = torch.zeros(len(heads), k, dtype=torch.int64, device=hidden.device)
    groups: dict[int, list[int]] = {}
    for row, h in enumerate(heads):
        if h is not None:
            groups.setdefault(id(h), []).append(row)
    starts = torch.tensor(first, dtype=torch.int64, device=hidden.device)
    for rows in groups.values():
        h = heads[rows[0]]
        index = torch.tensor(rows, dtype=torch.int64, device=hidden.device)
        at = starts[index] + accepted[index]
        out[index, : h.num_heads] = h.propose(hidden[at], logits_of)
    return out


class Speculator:
    """Runs a batch's decode steps with drafts (`step`), and counts what speculation did."""

    def __init__(
        self, config: SpeculationConfig, model: CausalLM, emitter: Emitter, adapters: AdapterManager | None = None
    ) -> None:
        self.config = config
        self.model = model
        self.emitter = emitter
        self.adapters = adapters  # whose installed adapters may carry Medusa heads
        self.drafted_tokens = 0  # drafts fed to the model, since start
        self.accepted_tokens = 0  # of them, those kept

    def heads_of(self, batch: Batch) -> list[MedusaHeads | None]:
        """Each row's Medusa heads (its adapter's, else the default adapter's), None for rows without."""
        if self.adapters is None or not self.adapters.medusa:
            return [None] * len(batch)
        return [self.adapters.medusa_for(s.request.adapter_index) for s in batch.seqs]

    def drafts(
        self, batch: Batch, lengths: list[int], heads: list[MedusaHeads | None]
    ) -> tuple[Drafted, torch.Tensor] | None:
        """The rows' drafts for this step and their lengths on the device: the Medusa heads' guesses for
        rows whose adapter has heads, prompt lookup's for the others. None when the step should be plain
        (the batch is too large, a row is at the model's recompute length, or no row drafts and no row
        needs its heads' next guesses)."""
        spec, model, dev = self.config, self.model, batch.next_ids.device
        at = model.recompute_at_length
        if len(batch) > spec.max_batch_size or (at is not None and at in lengths):
            return None
        guessing = any(h is not None for h in heads)
        if spec.tokens == 0 and not guessing:
            return None
        k = max([spec.tokens] + [h.num_heads for h in heads if h is not None])
        remaining = [s.request.max_new_tokens - len(s.generated) for s in batch.seqs]
        constrained = [s.matcher is not None for s in batch.seqs]
        caps = draft_caps(lengths, remaining, constrained, k, model.length_dependent_above)
        if not any(caps) and not guessing:
            return None
        grid, known, matched = self._proposals(batch, lengths, heads, caps, k)
        # One stream drafts its most: its step is bound by the weights' reads, not by the few tokens
        # fed, so drafts cost little. In a batch each fed draft costs about what a row does (compute
        # bound), and the run ends with its longest request whatever the others gain: there drafts are
        # rationed, each row starting at one and fed as many as its model kept of them before.
        ration = len(batch) > 1
        most = [h.num_heads if h is not None else spec.tokens for h in heads]
        counts = [
            row_drafts(kn, n, cap, min(m, self._limit(s)) if ration else m, spec.max_ngram)
            for kn, n, cap, m, s in zip(known, matched, caps, most, batch.seqs, strict=True)
        ]
        counts = within_budget(counts, matched, spec.max_batch_size - len(batch))
        if not any(counts) and not guessing:
            return None
        drafted = Drafted.build([s.generated[-1] for s in batch.seqs], grid, counts, dev)
        return drafted, torch.tensor(lengths, dtype=torch.int64).to(dev)

    def _proposals(
        self, batch: Batch, lengths: list[int], heads: list[MedusaHeads | None], caps: list[int], k: int
    ) -> tuple[list[list[int]], list[int], list[int]]:
        """Each row's drafts ([rows][k], zero padded), how many of them are known ids, and how long a
        match they came from (max_ngram for Medusa guesses): the guesses its heads made for its current
        length where its adapter has heads, else prompt lookup's (rows that may not draft skip it)."""
        most = self.config.max_ngram
        grid, known, matched = [[0] * k for _ in heads], [0] * len(heads), [0] * len(heads)
        for row, (seq, h, cap) in enumerate(zip(batch.seqs, heads, caps, strict=True)):
            if h is not None:
                found = seq.medusa_drafts if seq.medusa_at == lengths[row] else []
                n = most if found else 0
            elif self.config.tokens and cap:
                if seq.lookup is None:
                    seq.lookup = NgramIndex(seq.request.input_ids, most)
                found, n = seq.lookup.propose(seq.generated, k)
            else:
                continue
            grid[row][: len(found)] = found
            known[row], matched[row] = len(found), n
        return grid, known, matched

    def _limit(self, seq: Sequence) -> int:
        return 1 if seq.draft_limit is None else seq.draft_limit  # a row without a record tries one

    def step(
        self, batch: Batch, lengths: list[int], cache: KVCache, block_size: int, timings: StepTimings
    ) -> list[GenerationOut] | None:
        """A decode step in which rows also feed their drafts and keep those their sampling agrees with;
        None when no row drafts (the caller runs a plain step)."""
        heads = self.heads_of(batch)
        found = self.drafts(batch, lengths, heads)
        if found is None:
            return None
        drafted, lengths_t = found
        guessing = any(h is not None for h in heads)
        dev = lengths_t.device
        context = [n + c - 1 for n, c in zip(lengths, drafted.query_lens, strict=True)]
        segments = segments_of([s.request.adapter_index for s in batch.seqs], drafted.query_lens)
        every = torch.arange(drafted.ids.shape[0], device=dev)  # the logits of every fed token
        meta = ForwardBatch.build(drafted.ids, drafted.query_lens, context, batch.block_tables, block_size, every,
                                  segments)  # fmt: skip
        forward_start = time.perf_counter_ns()
        logits, hidden = (
            self.model.forward(meta, cache, hidden=True) if guessing else (self.model.forward(meta, cache), None)
        )
        if batch.matchers:  # constrained rows feed one token, at the row's first position
            rows = [drafted.first[r] for r in batch.grammar_rows]
            TokenMasks.fill(batch.matchers, rows, len(logits), self.model.config.vocab_size, dev).apply_(logits)
        v = verify(batch.sampler, logits, batch.history, batch.steps, batch.prompt_lens, lengths_t, drafted)
        top_n = max(s.request.top_n_tokens for s in batch.seqs)
        top = [t.tolist() for t in v.out.top_n(top_n)] if top_n else None
        k1 = v.tokens.shape[1]
        parts = [v.tokens.double(), v.logprobs.double(), v.accepted[:, None].double()]
        if hidden is not None:  # the heads guess on from where each row's kept tokens end
            parts.append(medusa_guesses(heads, hidden, drafted.first, v.accepted, self.model.logits_of).double())
        chosen = torch.cat(parts, 1).tolist()
        host_start = time.perf_counter_ns()
        timings.forward_ns = host_start - forward_start
        batch.history = advance_rows(batch.history, lengths_t, v)
        batch.next_ids = v.tokens.gather(1, v.accepted[:, None]).squeeze(1)
        batch.steps = batch.steps + v.accepted + 1
        if batch.matchers:
            advance(batch.matchers, [int(chosen[r][0]) for r in batch.grammar_rows])
        gens = []
        for row, seq in enumerate(batch.seqs):
            host = chosen[row]
            kept, fed = int(host[2 * k1]), drafted.query_lens[row] - 1
            self.drafted_tokens += fed
            self.accepted_tokens += kept
            seq.draft_limit = next_draft_limit(self._limit(seq), fed, kept, k1 - 1)
            if heads[row] is not None:
                seq.medusa_drafts = [int(t) for t in host[2 * k1 + 1 : 2 * k1 + 1 + heads[row].num_heads]]
                seq.medusa_at = lengths[row] + kept + 1
            for i in range(kept + 1):
                at = drafted.first[row] + i
                alternatives = (top[0][at], top[1][at]) if top is not None else None
                gens.append(self.emitter.emit(seq, int(host[i]), host[k1 + i], alternatives, i > 0))
                if gens[-1].finished is not None:
                    break
        timings.decode_ns = time.perf_counter_ns() - host_start
        return gens
