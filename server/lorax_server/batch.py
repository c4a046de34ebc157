"""State of one cached batch between gRPC calls: host-side per-request bookkeeping plus the device
tensors a decode step needs, kept row-aligned so filter/concatenate are single index ops."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import xgrammar as xgr

from .grammar import GrammarSpec, TokenMasks
from .kv_cache import BlockManager
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
class Sequence:
    """Host-side state of one request in a batch."""

    request: RequestIn
    block_table: list[int]
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    matcher: xgr.GrammarMatcher | None = None  # the grammar's parse state, for constrained requests
    generated: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens known so far (prompt + generated); the last one is not yet in the KV cache."""
        return len(self.request.input_ids) + len(self.generated)


class Batch:
    """Rows are requests; every tensor below is indexed by row."""

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
    ) -> None:
        self.id = batch_id
        self.seqs = seqs
        self.sampler = sampler
        self.next_ids = next_ids
        self.block_tables = block_tables
        self.history = history
        self.steps = steps
        self.prompt_lens = prompt_lens
        self._index_grammar_rows()

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
        return [s.request.id for s in self.seqs]

    @property
    def max_tokens(self) -> int:
        """Tokens reserved in the KV cache for this batch."""
        return sum(len(s.request.input_ids) + s.request.max_new_tokens for s in self.seqs)

    def filter(self, keep_rows: list[int], blocks: BlockManager) -> None:
        """Keep `keep_rows` (in order) and free the KV blocks of every other row."""
        keep_set = set(keep_rows)
        for row, seq in enumerate(self.seqs):
            if row not in keep_set:
                blocks.free(seq.block_table)
        self.seqs = [self.seqs[r] for r in keep_rows]
        if not keep_rows:
            return
        index = torch.tensor(keep_rows, dtype=torch.int64, device=self.next_ids.device)
        self.sampler = self.sampler.filter(index)
        self.next_ids = self.next_ids[index]
        self.steps = self.steps[index]
        self.prompt_lens = self.prompt_lens[index]
        self._index_grammar_rows()
        self.history = self.history[
            index, : max(len(s.request.input_ids) + s.request.max_new_tokens for s in self.seqs)
        ]
        width = max(len(s.block_table) for s in self.seqs)
        self.block_tables = self.block_tables[index, :width]

    def free(self, blocks: BlockManager) -> None:
        self.filter([], blocks)

    @property
    def adapter_indices(self) -> list[int]:
        return [s.request.adapter_index for s in self.seqs]

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
        indices = self.adapter_indices
        rows = sorted(range(len(indices)), key=indices.__getitem__)
        if rows != list(range(len(rows))):
            self.reorder(rows)

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """One batch holding every row of `batches`, grouped by adapter; keeps the first batch's id."""
        if len(batches) == 1:
            return batches[0]
        merged = cls(
            batches[0].id,
            [s for b in batches for s in b.seqs],
            BatchSampler.concatenate([b.sampler for b in batches]),
            torch.cat([b.next_ids for b in batches]),
            _cat_padded([b.block_tables for b in batches], pad=0),
            _cat_padded([b.history for b in batches], pad=-1),
            torch.cat([b.steps for b in batches]),
            torch.cat([b.prompt_lens for b in batches]),
        )
        merged.group_by_adapter()
        return merged


def _cat_padded(tensors: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Concatenate [rows_i, cols_i] tensors along rows, right-padding columns with `pad`."""
    width = max(t.shape[1] for t in tensors)
    rows = sum(t.shape[0] for t in tensors)
    out = tensors[0].new_full((rows, width), pad)
    start = 0
    for t in tensors:
        out[start : start + t.shape[0], : t.shape[1]] = t
        start += t.shape[0]
    return out
