"""Prompts on their way into the KV cache: block tables that start with the prefix cache's hits, the
piece of each prompt a step computes (all of it, or under chunked prefill what the chunk budget
allows), prompt logprobs gathered piece by piece, and the rows that whole prompts become.

A request is `Pending` from its prefill until its whole prompt is cached; the engine's step computes
the pieces `pieces` chooses, then turns whole prompts into rows with `start_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .batch import Batch, Pending, RequestIn, Sequence
from .kv_cache import BlockManager
from .prefix_cache import block_hashes
from .sampling import BatchSampler
from .stopping import StoppingCriteria
from .utils.tokens import IncrementalDetokenizer

Piece = tuple[Pending, int, int]  # a request and the prompt tokens [start, end) a step computes


def allocate(
    batch: Batch,
    requests: list[RequestIn],
    matchers: list,
    blocks: BlockManager,
    identity: Callable[[RequestIn], object] | None,
    chunk_tokens: int | None,
    registered: list[int],
) -> int:
    """Make every request a pending one of `batch`, with its block table; returns the prompt tokens found
    cached. With `identity` (a request → what its prefix keys are salted with; None: no prefix caching)
    a table starts with the cached blocks of its prompt's prefix, which need no computing, and the
    prompt blocks the first step computes are registered at once (into `registered`): a later request
    of the same batch with the same prefix then reads them as they are written, since every layer
    writes the whole batch's keys and values before any token attends."""
    bs = blocks.block_size
    budget = chunk_tokens if chunk_tokens is not None else math.inf  # spent as `pieces` spends it
    cached_total = 0
    for r, matcher in zip(requests, matchers, strict=True):
        n = len(r.input_ids)
        keys = block_hashes(identity(r), r.input_ids, bs, n // bs) if identity else []
        # The last prompt token is always computed (its logits choose the first token); prompt logprobs
        # need every prompt token's logits.
        usable = 0 if r.prefill_logprobs else (n - 1) // bs
        table = blocks.match(keys[:usable])
        cached = len(table) * bs
        logprobs = [math.nan] if r.prefill_logprobs else []  # the first token has none
        batch.pending.append(Pending(r, table, cached, keys, matcher, logprobs))
        blocks.append(table, n + r.max_new_tokens)
        cached_total += cached
        computed = int(min(n - cached, budget))
        budget -= computed
        registered += blocks.register(table, keys[: (cached + computed) // bs])
    return cached_total


def pieces(pending: list[Pending], chunk_tokens: int | None) -> list[Piece]:
    """What each pending prompt computes this step: all that is left, or under chunked prefill what the
    chunk budget allows, oldest first."""
    budget = chunk_tokens if chunk_tokens is not None else math.inf
    out = []
    for p in pending:
        take = int(min(p.remaining, budget))
        if take <= 0:
            break
        out.append((p, p.done, p.done + take))
        budget -= take
    return out


def add_prompt_logprobs(p: Pending, logits: torch.Tensor, start: int, end: int) -> None:
    """The logprob of each prompt token after `start` that the logits of the piece `[start, end)` predict."""
    ids = p.request.input_ids
    targets = torch.tensor(ids[start + 1 : end + 1], dtype=torch.int64, device=logits.device)
    logprobs = torch.log_softmax(logits[: targets.shape[0]].float(), dim=-1)
    p.prompt_logprobs += logprobs.gather(1, targets[:, None]).squeeze(1).tolist()


def start_rows(
    batch_id: int, whole: list[Pending], eos_ids: set[int], tokenizer, special_ids: set[int], device: torch.device
) -> Batch:  # noqa: ANN001 - tokenizer: a transformers tokenizer
    """Requests whose prompt is now in the KV cache, as the rows of a new batch (before their first token)."""
    requests = [p.request for p in whole]
    lens = torch.tensor([len(r.input_ids) for r in requests], dtype=torch.int64, device=device)
    flat = torch.tensor([t for r in requests for t in r.input_ids], dtype=torch.int64, device=device)
    row_of = torch.repeat_interleave(torch.arange(len(requests), device=device), lens, output_size=flat.shape[0])
    position = torch.arange(flat.shape[0], device=device) - (torch.cumsum(lens, 0) - lens)[row_of]
    width = max(len(r.input_ids) + r.max_new_tokens for r in requests)
    history = torch.full((len(requests), width), -1, dtype=torch.int64, device=device)
    history[row_of, position] = flat
    seqs = [
        Sequence(
            r,
            p.block_table,
            StoppingCriteria(eos_ids, r.max_new_tokens, list(r.stop_sequences), r.ignore_eos),
            IncrementalDetokenizer(tokenizer, list(r.input_ids), special_ids),
            p.matcher,
        )
        for p, r in zip(whole, requests, strict=True)
    ]
    width = max(len(p.block_table) for p in whole)
    tables = [p.block_table + [0] * (width - len(p.block_table)) for p in whole]
    return Batch(
        batch_id,
        seqs,
        BatchSampler.from_params([r.sampling for r in requests], device),
        flat.new_zeros(len(requests)),
        torch.tensor(tables, dtype=torch.int64, device=device),
        history,
        torch.zeros(len(requests), dtype=torch.int64, device=device),
        lens,
    )
