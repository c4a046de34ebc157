"""Run tiny models tensor-parallel: N real processes in one gloo group, each loading its rank's slices.

`python tp_ranks.py RANK WORLD_SIZE PORT JOB OUT` is one rank: JOB (json) lists models with their
adapters; every rank runs the same mixed-adapter ragged prefill and greedy decode steps
(`mixed_batch_run`), and rank 0 saves the logits to OUT. `run_ranks` starts the N processes;
`mixed_batch_run` with the default group is the one-process reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lorax_server.adapters.lora import segments_of
from lorax_server.adapters.manager import AdapterManager, AdapterRequest
from lorax_server.adapters.merge_into_base import merge_into_base
from lorax_server.forward import ForwardBatch
from lorax_server.kv_cache import BlockManager, KVCache
from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.parallel import init_process_group
from lorax_server.models.loader import load_model

BLOCK = 4
LENGTHS = [7, 3, 12, 5]
ADAPTER_PER_ROW = [0, 1, 2, 2]  # a base row and two adapters, one of them on two rows
STEPS = 6


@torch.no_grad()
def mixed_batch_run(
    model_dir: str,
    adapters: list[str],
    rank: int = 0,
    world_size: int = 1,
    quantize: str | None = None,
    merge: str | None = None,
) -> dict[str, torch.Tensor]:
    """Prefill logits of every prompt token [sum(LENGTHS), vocab] and STEPS greedy decode steps
    [rows, STEPS, vocab], rows using ADAPTER_PER_ROW (adapter i is `adapters[i - 1]`); with `merge`, that
    adapter's update is first added to the base weights (`--merge-adapter-weights`)."""
    model = load_model(model_dir, TorchAttention(BLOCK), torch.device("cpu"), "float32", rank, world_size,
                       quantize=quantize)  # fmt: skip
    if merge is not None:
        merge_into_base(model, Path(merge))
    manager = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for i, path in enumerate(adapters, start=1):
        request = AdapterRequest(ids=(path,), source="local")
        manager.install(i, request, manager.prepare(request))
    layers, kv_heads, head_dim, dtype = model.cache_geometry
    cache = KVCache(layers, 128, BLOCK, kv_heads, head_dim, dtype, torch.device("cpu"))
    blocks = BlockManager(128, BLOCK)
    tables = [blocks.allocate(n + STEPS) for n in LENGTHS]
    width = max(len(t) for t in tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in LENGTHS])
    per_row = ADAPTER_PER_ROW[: len(adapters) + 1] + [len(adapters)] * (len(LENGTHS) - len(adapters) - 1)
    meta = ForwardBatch.build(ids, LENGTHS, LENGTHS, tables, BLOCK, logits_index=torch.arange(len(ids)),
                              lora_segments=segments_of(per_row, LENGTHS))  # fmt: skip
    prefill = model.forward(meta, cache)
    ends = torch.tensor(LENGTHS).cumsum(0) - 1
    steps, lengths = [prefill[ends]], list(LENGTHS)
    for _ in range(STEPS - 1):
        lengths = [n + 1 for n in lengths]
        ones = [1] * len(lengths)
        meta = ForwardBatch.build(steps[-1].argmax(-1), ones, lengths, tables, BLOCK,
                                  lora_segments=segments_of(per_row, ones))  # fmt: skip
        steps.append(model.forward(meta, cache))
    return {"prefill": prefill, "decoded": torch.stack(steps, dim=1)}


def engine_tokens(
    model_dir: str | Path, adapters: list[str], requests: list[tuple[list[int], int, int]]
) -> list[list[tuple[int, float]]]:
    """(token, logprob) of each greedy request (prompt ids, adapter index (i: `adapters[i - 1]`, 0: base),
    new tokens), all in one batch of the engine in this process: one shard."""
    from transformers import AutoTokenizer

    from lorax_server.batch import RequestIn
    from lorax_server.engine import CacheConfig, Engine
    from lorax_server.sampling import SamplingParams

    model = load_model(model_dir, TorchAttention(16), torch.device("cpu"), "float32")
    manager = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for i, path in enumerate(adapters, start=1):
        request = AdapterRequest(ids=(str(path),), source="local")
        manager.install(i, request, manager.prepare(request))
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), CacheConfig(16, num_blocks=256), manager)
    engine.warmup(max_input_length=64, max_prefill_tokens=512, max_total_tokens=128)
    batch_in = [
        RequestIn(id=i, input_ids=ids, sampling=SamplingParams(), max_new_tokens=n, ignore_eos=True, adapter_index=a)
        for i, (ids, a, n) in enumerate(requests)
    ]
    out: list[list[tuple[int, float]]] = [[] for _ in requests]
    gens, batch = engine.prefill(1, batch_in)
    while True:
        for g in gens:
            out[g.request_id].append((g.token_id, g.logprob))
        if batch is None:
            return out
        gens, batch = engine.decode([batch.id])


def run_ranks(jobs: list[dict], out: Path, world_size: int = 2, port: int = 29611, timeout: float = 600) -> dict:
    """Run `jobs` ({"name", "model_dir", "adapters", "quantize"?, "merge"?}) on `world_size` rank processes;
    rank 0's results by job name."""
    job_file = out.with_suffix(".json")
    job_file.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(world_size), str(port), str(job_file), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(world_size)
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    failed = [(rank, p.returncode, log) for rank, (p, log) in enumerate(zip(procs, logs, strict=True)) if p.returncode]
    assert not failed, "\n".join(f"rank {r} exited {code}:\n{log[-4000:]}" for r, code, log in failed)
    return torch.load(out)


def main() -> None:
    rank, world_size, port = (int(a) for a in sys.argv[1:4])
    jobs, out = json.loads(Path(sys.argv[4]).read_text()), Path(sys.argv[5])
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group(rank, world_size, torch.device("cpu"))
    results = {}
    for job in jobs:
        results[job["name"]] = mixed_batch_run(
            job["model_dir"], job["adapters"], rank, world_size, job.get("quantize"), job.get("merge")
        )
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # leave together: a rank exiting while another is still in the group aborts it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
