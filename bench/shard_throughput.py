"""Generated tokens/s of our engine vs transformers on the same ragged workload, measured in one run.

Workload (DESIGN.md's performance target, base model only): a random Llama with hidden 512 and 8
layers, N requests with prompts of 16–128 tokens and outputs of 16–128 tokens, greedy.
- ours: every request prefilled (in prefill-budget chunks that join the running batch) then decoded
  with continuous batching; a request leaves the batch as soon as it is done.
- baseline: transformers `generate` on static, left-padded batches of the same requests; each batch
  runs until its longest output is done (what a server without continuous batching does).
Only useful tokens count for both. Prints a table with the ratio; not a test.

    .venv/bin/python bench/shard_throughput.py [--requests 64] [--baseline-batch 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server" / "tests"))
from tiny_models import make_llama  # noqa: E402

from lorax_server.batch import RequestIn  # noqa: E402
from lorax_server.engine import CacheConfig, Engine  # noqa: E402
from lorax_server.layers.attention import TorchAttention  # noqa: E402
from lorax_server.models.loader import load_model  # noqa: E402
from lorax_server.sampling import SamplingParams  # noqa: E402
from lorax_server.utils.memory import keep_freed_memory  # noqa: E402

MODEL = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
)


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(16, 129, (1,), generator=g))
        o = int(torch.randint(16, 129, (1,), generator=g))
        out.append((torch.randint(3, vocab, (p,), generator=g).tolist(), o))
    return out


def run_ours(
    model_dir: Path, work: list[tuple[list[int], int]], prefill_budget: int, policy: tuple[float, int] | None = None
) -> tuple[int, float]:
    model = load_model(model_dir, TorchAttention(16), torch.device("cpu"), "float32")
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), CacheConfig(16, num_blocks=2048))
    engine.warmup(256, prefill_budget, 512)
    requests = [
        RequestIn(id=i, input_ids=ids, sampling=SamplingParams(), max_new_tokens=o, ignore_eos=True)
        for i, (ids, o) in enumerate(work)
    ]
    return serve_all(engine, requests, prefill_budget, policy)


# The router's defaults (LoRAX's): a running batch takes new requests only when at least 1.2 times
# as many wait as run, or after 20 decode steps; and, with eager prefill, as many prefills as the
# waiting requests make before the next decode step.
ROUTER_POLICY = (1.2, 20)


def serve_all(
    engine: Engine, requests: list[RequestIn], prefill_budget: int, policy: tuple[float, int] | None = None
) -> tuple[int, float]:
    """Run every request to completion the way the router does: prefill waiting requests in chunks of
    the prefill budget, each chunk joining the running batch. Without a `policy` one chunk joins at the
    next step; with `(waiting_served_ratio, max_waiting_tokens)` chunks join as the router's would (see
    ROUTER_POLICY): every chunk that may join is prefilled before the next decode step (eager prefill).
    Returns (tokens generated, seconds)."""
    keep_freed_memory()  # as the shard process does on the CPU
    generated, running, batch_id, waited = 0, None, 0, 0
    pending = list(requests)
    start = time.perf_counter()
    while pending or running is not None:
        # The router's queue admits a chunk only of at least min_size requests, decided once a step.
        admits = running is None or policy is None or waited >= policy[1]
        min_size = 0 if admits else int(len(running.request_ids) * policy[0])
        joining = []
        while chunk := _next_chunk(pending, prefill_budget, running is None and not joining, min_size):
            batch_id += 1
            gens, new = engine.prefill(batch_id, chunk)
            generated += len(gens)
            waited = 0
            joining += [new] if new is not None else []
            if policy is None:
                break
        ids = [b.id for b in (running, *joining) if b is not None]
        if ids:
            gens, running = engine.decode(ids)
            generated += len(gens)
        waited += 1
    return generated, time.perf_counter() - start


def _next_chunk(pending: list[RequestIn], budget: int, alone: bool, min_size: int) -> list[RequestIn]:
    """The waiting requests the next prefill takes (removed from `pending`): as many as fit the budget
    (the first one whatever its size when nothing runs), none when fewer than `min_size` fit."""
    chunk, tokens = [], 0
    for request in pending:
        if tokens + len(request.input_ids) > budget and (chunk or not alone):
            break
        tokens += len(request.input_ids)
        chunk.append(request)
    if not chunk or len(chunk) < min_size:
        return []
    del pending[: len(chunk)]
    return chunk


@torch.no_grad()
def generate_in_static_batches(
    model: torch.nn.Module,
    work: list[tuple[list[int], int]],
    batch_size: int,
    adapter_names: Callable[[int], str] | None = None,
) -> tuple[int, float]:
    """`model.generate` on `work` in batches of `batch_size` (left-padded, each run to its longest output):
    the tokens asked for and the seconds. `adapter_names(request index)`: peft's adapter of each row."""
    generated = 0
    start = time.perf_counter()
    for first in range(0, len(work), batch_size):
        group = work[first : first + batch_size]
        width = max(len(ids) for ids, _ in group)
        input_ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(group):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        rows = range(first, first + len(group))
        names = {} if adapter_names is None else {"adapter_names": [adapter_names(i) for i in rows]}
        longest = max(o for _, o in group)
        model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=0,
            **names,
        )
        generated += sum(o for _, o in group)
    return generated, time.perf_counter() - start


def run_transformers(model_dir: Path, work: list[tuple[list[int], int]], batch_size: int) -> tuple[int, float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return generate_in_static_batches(model, work, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--baseline-batch", type=int, default=16)
    parser.add_argument("--prefill-budget", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_llama(Path(tmp) / "bench", **MODEL)
        vocab = AutoTokenizer.from_pretrained(model_dir).vocab_size
        work = workload(args.requests, vocab)
        base_tokens, base_s = run_transformers(model_dir, work, args.baseline_batch)
        ours_tokens, ours_s = run_ours(model_dir, work, args.prefill_budget)
    assert base_tokens == ours_tokens == sum(o for _, o in work)
    base_tps, ours_tps = base_tokens / base_s, ours_tokens / ours_s
    print(f"| {'system':<42} | {'tokens':>7} | {'seconds':>8} | {'tokens/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 8}|")
    print(
        f"| {'transformers generate, static batches of ' + str(args.baseline_batch):<42} | "
        f"{base_tokens:>7} | {base_s:>8.2f} | {base_tps:>9.1f} | {1.0:>6.2f} |"
    )
    print(
        f"| {'lorax_server engine, continuous batching':<42} | {ours_tokens:>7} | {ours_s:>8.2f} | "
        f"{ours_tps:>9.1f} | {ours_tps / base_tps:>6.2f} |"
    )
    print(
        f"\n{args.requests} requests, prompts 16-128, outputs 16-128, greedy, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
