"""State of one cached batch between gRPC calls: host-side per-request bookkeeping plus the device
tensors a decode step needs, kept row-aligned so filter/concatenate are single index ops."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import xgrammar as xgr

from .grammar import GrammarSpec, TokenMasks
from .kv_cache import BlockManager
from .prompt_lookup import NgramIndex
from .sampling import BatchSampler, SamplingParams
from .stopping import StoppingCriteria
from .utils.tokens import IncrementalDetokenizer


@dataclass
class RequestIn:
    """One request as the shard receives it (proto-free)."""

    id: int
    input_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    prefill_logprobs: bool = False
    top_n_tokens: int = 0
    adapter_index: int = 0
    grammar: GrammarSpec | None = None  # constrain the output (None: unconstrained)


@dataclass
class Pending:
    """A request whose prompt is not wholly in the KV cache yet. It becomes a row of its batch once it
    is: in its prefill step, or after several steps under chunked prefill."""

    request: RequestIn
    block_table: list[int]
    done: int  # prompt tokens whose keys and values are cached (a prefix cache hit, then computed pieces)
    keys: list[bytes]  # prefix-cache keys of its full prompt blocks ([] without prefix caching)
    matcher: xgr.GrammarMatcher | None = None
    prompt_logprobs: list[float] = field(default_factory=list)  # prefill_logprobs requests: those computed

    @property
    def remaining(self) -> int:
        return len(self.request.input_ids) - self.done


@dataclass
class Sequence:
    """Host-side state of one request in a batch."""

    request: RequestIn
    block_table: list[int]
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    matcher: xgr.GrammarMatcher | None = None  # the grammar's parse state, for constrained requests
    generated: list[int] = field(default_factory=list)
    draft_limit: int | None = None  # speculative decoding: most drafts it feeds next in a batch (None: one)
    medusa_drafts: list[int] = field(default_factory=list)  # its adapter's Medusa heads' guesses...
    medusa_at: int = -1  # ...for the tokens after its first `medusa_at` (stale once it is longer)
    lookup: NgramIndex | None = None  # speculative decoding: its prompt-lookup index, made at first use

    @property
    def length(self) -> int:
        """Tokens known so far (prompt + generated); the last one is not yet in the KV cache."""
        return len(self.request.input_ids) + len(self.generated)


class Batch:
    """Rows are requests that generate; every tensor below is indexed by row. `pending` are requests
    of the batch still being prefilled (not rows yet)."""

    def __init__(
        self,
        batch_id: int,
        seqs: list[Sequence],
        sampler: BatchSampler,
        next_ids: torch.Tensor,  # [batch] int64, token to feed at the next decode step
        block_tables: torch.Tensor,  # [batch, max_blocks] int64
        history: torch.Tensor,  # [batch, max_len] int64, prompt + generated ids, -1 padded
        steps: torch.Tensor,  # [batch] int64, tokens generated so far
        prompt_lens: torch.Tensor,  # [batch] int64, where each row's generated tokens start in history
        pending: list[Pending] | None = None,
    ) -> None:
        self.id = batch_id
        self.seqs = seqs
        self.sampler = sampler
        self.next_ids = next_ids
        self.block_tables = block_tables
        self.history = history
        self.steps = steps
        self.prompt_lens = prompt_lens
        self.pending = pending or []
        self._index_grammar_rows()

    @classmethod
    def empty(cls, batch_id: int, device: torch.device) -> Batch:
        """A batch without rows (its requests are all pending)."""
        none = torch.zeros(0, dtype=torch.int64, device=device)
        grid = none.view(0, 0)
        return cls(batch_id, [], BatchSampler.from_params([], device), none, grid, grid, none, none)

    def _index_grammar_rows(self) -> None:
        """Which rows are constrained (redone whenever rows change, never per step)."""
        rows = [r for r, s in enumerate(self.seqs) if s.matcher is not None]
        self.grammar_rows = rows
        self.matchers = [self.seqs[r].matcher for r in rows]

    def token_masks(self, vocab: int) -> TokenMasks | None:
        """This step's allowed tokens of the constrained rows; None when no row is constrained."""
        if not self.matchers:
            return None
        return TokenMasks.fill(self.matchers, self.grammar_rows, len(self), vocab, self.next_ids.device)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def request_ids(self) -> list[int]:
        return [s.request.id for s in self.seqs] + [p.request.id for p in self.pending]

    @property
    def max_tokens(self) -> int:
        """Tokens reserved in the KV cache for this batch."""
        requests = [s.request for s in self.seqs] + [p.request for p in self.pending]
        return sum(len(r.input_ids) + r.max_new_tokens for r in requests)

    def filter(self, keep_rows: list[int], blocks: BlockManager, keep_pending: set[int] | None = None) -> None:
        """Keep `keep_rows` (in order) and the pending requests whose id is in `keep_pending` (all of them
        when None); free the KV blocks of every other."""
        if keep_pending is not None:
            for p in self.pending:
                if p.request.id not in keep_pending:
                    blocks.free(p.block_table)
            self.pending = [p for p in self.pending if p.request.id in keep_pending]
        keep_set = set(keep_rows)
        for row, seq in enumerate(self.seqs):
            if row not in keep_set:
                blocks.free(seq.block_table)
        self.seqs = [self.seqs[r] for r in keep_rows]
        index = torch.tensor(keep_rows, dtype=torch.int64, device=self.next_ids.device)
        self.sampler = self.sampler.filter(index)
        self.next_ids = self.next_ids[index]
        self.steps = self.steps[index]
        self.prompt_lens = self.prompt_lens[index]
        self._index_grammar_rows()
        width = max((len(s.request.input_ids) + s.request.max_new_tokens for s in self.seqs), default=0)
        self.history = self.history[index, :width]
        self.block_tables = self.block_tables[index, : max((len(s.block_table) for s in self.seqs), default=0)]

    def free(self, blocks: BlockManager) -> None:
        self.filter([], blocks, keep_pending=set())

    @property
    def adapter_indices(self) -> list[int]:
        """The adapter of every request of the batch, rows and pending."""
        return [s.request.adapter_index for s in self.seqs] + [p.request.adapter_index for p in self.pending]

    def reorder(self, rows: list[int]) -> None:
        """Permute the rows (no row is dropped)."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.next_ids.device)
        self.seqs = [self.seqs[r] for r in rows]
        self.sampler = self.sampler.filter(index)
        self.next_ids = self.next_ids[index]
        self.steps = self.steps[index]
        self.prompt_lens = self.prompt_lens[index]
        self.history = self.history[index]
        self.block_tables = self.block_tables[index]
        self._index_grammar_rows()

    def group_by_adapter(self) -> None:
        """Keep rows of one adapter contiguous so each adapter's tokens form one segment."""
        indices = [s.request.adapter_index for s in self.seqs]
        rows = sorted(range(len(indices)), key=indices.__getitem__)
        if rows != list(range(len(rows))):
            self.reorder(rows)

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """One batch holding every row and pending request of `batches`, rows grouped by adapter; keeps
        the first batch's id."""
        if len(batches) == 1:
            return batches[0]
        with_rows = [b for b in batches if len(b)] or batches[:1]
        merged = cls(
            batches[0].id,
            [s for b in with_rows for s in b.seqs],
            BatchSampler.concatenate([b.sampler for b in with_rows]),
            torch.cat([b.next_ids for b in with_rows]),
            cat_padded([b.block_tables for b in with_rows], pad=0),
            cat_padded([b.history for b in with_rows], pad=-1),
            torch.cat([b.steps for b in with_rows]),
            torch.cat([b.prompt_lens for b in with_rows]),
            [p for b in batches for p in b.pending],
        )
        merged.group_by_adapter()
        return merged


def cat_padded(tensors: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Concatenate [rows_i, cols_i] tensors along rows, right-padding columns with `pad`."""
    width = max(t.shape[1] for t in tensors)
    rows = sum(t.shape[0] for t in tensors)
    out = tensors[0].new_full((rows, width), pad)
    start = 0
    for t in tensors:
        out[start : start + t.shape[0], : t.shape[1]] = t
        start += t.shape[0]
    return out
