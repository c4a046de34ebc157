"""Tensor parallelism: two real rank processes in a gloo group give the logits of one process, for every
family with mixed adapters (expert LoRA, replicated KV heads, load-time quantization included); a 2-rank
shard set served over gRPC answers like one shard, adapters loaded and offloaded on both ranks; models
that do not split say which number does not divide."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import transformers
from families import FAMILIES, LORA_KWARGS, build_family
from test_expert_lora import ADAPTERS as EXPERT_ADAPTERS
from test_expert_lora import write_adapter
from tiny_models import make_lora_adapter, make_model
from tp_ranks import engine_tokens, mixed_batch_run, run_ranks

from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.parallel import LinearShard, ShardingError, TensorParallel
from lorax_server.models.loader import load_model
from lorax_server.pb import generate_pb2 as pb
from lorax_server.pb import generate_pb2_grpc as pb_grpc
from lorax_server.utils.weights import Weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- who holds what
def test_heads_intermediate_and_vocab_split_evenly_or_say_which_number_does_not() -> None:
    assert [TensorParallel(r, 2).split(8, "heads") for r in range(2)] == [(0, 4), (4, 4)]
    with pytest.raises(ShardingError, match=r"the number of attention heads \(6\) does not divide over 4 shards"):
        TensorParallel(1, 4).split(6, "the number of attention heads")
    # Fewer kv heads than ranks: each rank reads the one its query heads share.
    assert [TensorParallel(r, 4).kv_heads(2, 8) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [TensorParallel(r, 2).kv_heads(4, 8) for r in range(2)] == [(0, 2), (2, 2)]
    with pytest.raises(ShardingError, match=r"key/value heads \(3\)"):
        TensorParallel(0, 4).kv_heads(3, 12)
    # An uneven vocabulary: blocks of ceil(vocab / ranks), the last rank holds the rest.
    assert [TensorParallel(r, 2).vocab(321) for r in range(2)] == [(0, 161), (161, 160)]
    with pytest.raises(ShardingError, match="vocabulary of 2 tokens"):
        TensorParallel(2, 3).vocab(2)


def test_lora_factors_are_sliced_like_their_linear() -> None:
    a, b = torch.randn(4, 10), torch.randn(12, 4)
    column = LinearShard(10, (12,), rows=(((0, 2), (6, 3)),))  # a fused part: two ranges of its rows
    sliced_a, sliced_b = column.lora(0, a, b)
    assert torch.equal(sliced_a, a) and torch.equal(sliced_b, torch.cat([b[0:2], b[6:9]]))
    row = LinearShard(10, (12,), cols=(5, 5))
    sliced_a, sliced_b = row.lora(0, a, b)
    assert torch.equal(sliced_a, a[:, 5:]) and torch.equal(sliced_b, b)
    # The rank's partial updates sum to the whole update, as the row-parallel all-reduce does.
    x = torch.randn(3, 10)
    first = LinearShard(10, (12,), cols=(0, 5))
    partials = [x[:, start : start + 5] @ shard.lora(0, a, b)[0].t() @ b.t() for start, shard in ((0, first), (5, row))]
    assert torch.allclose(partials[0] + partials[1], x @ a.t() @ b.t(), atol=1e-5)


def test_weights_read_only_the_ranges_asked_for(llama_dir: Path) -> None:
    weights = Weights(llama_dir, torch.float32, torch.device("cpu"), 1, 2)
    full = weights.get("model.layers.0.self_attn.q_proj.weight")
    ranges = ((0, 16), (32, 8))
    got = weights.get_ranges("model.layers.0.self_attn.q_proj.weight", 0, ranges)
    assert torch.equal(got, torch.cat([full[0:16], full[32:40]]))
    assert torch.equal(weights.get_ranges("model.layers.0.self_attn.q_proj.weight", 1, ((8, 8),)), full[:, 8:16])
    with pytest.raises(Exception, match="outside dim 0"):
        weights.get_ranges("model.layers.0.self_attn.q_proj.weight", 0, ((60, 8),))


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        ({"num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 48}, 16, "attention heads \\(8\\)"),
        ({"intermediate_size": 130}, 4, "intermediate_size \\(130\\) does not divide over 4 shards"),
        ({"num_attention_heads": 4, "num_key_value_heads": 4}, 3, "attention heads \\(4\\) does not divide over 3"),
    ],
)
def test_models_that_do_not_split_say_which_number(tmp_path: Path, overrides: dict, world: int, message: str) -> None:
    model_dir = make_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp_path / "m", **overrides)
    with pytest.raises(ShardingError, match=message):
        load_model(model_dir, TorchAttention(4), torch.device("cpu"), "float32", rank=0, world_size=world)


# ---------------------------------------------------------------------------- two ranks = one process
def _family_jobs(tmp: Path) -> list[dict]:
    jobs = []
    for name in [*sorted(FAMILIES), "qwen_v1"]:
        model_dir, _ = build_family(name, tmp / name)
        adapters = []
        if name in FAMILIES:
            _, model_cls, _, targets = FAMILIES[name]
            kwargs = LORA_KWARGS.get(model_cls, {})
            adapters = [
                str(
                    make_lora_adapter(
                        model_dir, tmp / name / f"lora{i}", i, r=4 * (i + 1), lora_alpha=8, target_modules=t, **kwargs
                    )
                )  # fmt: skip
                for i, t in enumerate(targets)
            ]
        jobs.append({"name": name, "model_dir": str(model_dir), "adapters": adapters})
    # Mixtral's experts adapted, in the per-expert layout hub adapters use.
    mixtral = next(j for j in jobs if j["name"] == "mixtral")
    expert_adapters = [
        str(write_adapter(tmp / f"experts{i}", i, *spec)) for i, spec in enumerate(EXPERT_ADAPTERS.values())
    ]
    jobs.append({"name": "mixtral_expert_lora", "model_dir": mixtral["model_dir"], "adapters": expert_adapters})
    # One kv head for two ranks: replicated.
    mqa = make_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp / "mqa", num_key_value_heads=1)
    mqa_adapter = make_lora_adapter(mqa, tmp / "mqa_lora", 1, r=8, target_modules=["k_proj", "v_proj", "o_proj"])
    jobs.append({"name": "mqa", "model_dir": str(mqa), "adapters": [str(mqa_adapter)]})
    # Load-time 4-bit: blocks of 64 inputs, so each rank's input columns (64, 128) hold whole blocks.
    wide = make_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp / "wide", hidden_size=128,
                      intermediate_size=256)  # fmt: skip
    wide_adapter = make_lora_adapter(wide, tmp / "wide_lora", 2, r=8, target_modules=["q_proj", "o_proj", "down_proj"])
    jobs.append(
        {"name": "nf4", "model_dir": str(wide), "adapters": [str(wide_adapter)], "quantize": "bitsandbytes-nf4"}
    )
    # --merge-adapter-weights: each rank adds its slice of the update (column- and row-parallel parts),
    # and another adapter still applies on top.
    llama = next(j for j in jobs if j["name"] == "llama")
    merged = make_lora_adapter(llama["model_dir"], tmp / "merged_lora", 9, r=8, lora_alpha=16,
                               target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])  # fmt: skip
    jobs.append({**llama, "name": "llama_merged", "merge": str(merged)})
    return jobs


def test_two_ranks_give_the_logits_of_one_process_for_every_family(tmp_path: Path) -> None:
    jobs = _family_jobs(tmp_path)
    sharded = run_ranks(jobs, tmp_path / "ranks.pt", world_size=2, port=free_port())
    for job in jobs:
        want = mixed_batch_run(job["model_dir"], job["adapters"], quantize=job.get("quantize"), merge=job.get("merge"))
        got = sharded[job["name"]]
        assert (got["prefill"] - want["prefill"]).abs().max() < 1e-4, job["name"]
        assert (got["decoded"] - want["decoded"]).abs().max() < 1e-4, job["name"]
        assert torch.equal(got["decoded"].argmax(-1), want["decoded"].argmax(-1)), job["name"]


# ---------------------------------------------------------------------------- a 2-rank shard set over gRPC
def _start_ranks(model_dir: Path, uds: str, world: int) -> list[subprocess.Popen]:
    exe = shutil.which("lorax-server", path=str(Path(sys.executable).parent)) or "lorax-server"
    port = str(free_port())
    return [
        subprocess.Popen(
            [
                exe,
                "serve",
                str(model_dir),
                "--uds-path",
                uds,
                "--dtype",
                "float32",
                "--kv-cache-blocks",
                "64",
                "--speculative-tokens",  # drafts verified on every rank alike: the answers do not change
                "3",
                "--sharded",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
            },
        )  # fmt: skip
        for rank in range(world)
    ]


def _request(rid: int, ids: list[int], max_new: int, adapter_index: int = 0) -> pb.Request:
    return pb.Request(
        id=rid,
        input_ids=ids,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
        adapter_index=adapter_index,
    )


class _Ranks:
    """Stubs for every rank's socket; `call` sends one RPC to all of them at once, as the router does."""

    def __init__(self, sockets: list[Path]) -> None:
        self.channels = [grpc.insecure_channel(f"unix://{s}") for s in sockets]
        self.stubs = [pb_grpc.LoraxServiceStub(c) for c in self.channels]
        self.pool = ThreadPoolExecutor(len(sockets))

    def call(self, method: str, request: object) -> list:
        return list(self.pool.map(lambda stub: getattr(stub, method)(request, timeout=120), self.stubs))

    def close(self) -> None:
        self.pool.shutdown()
        for c in self.channels:
            c.close()


def _generate(call, requests: list[pb.Request], batch_id: int, skipped: list[bool] | None = None) -> dict:  # noqa: ANN001
    """Each request's (token, logprob) list; `skipped` collects the generations' skipped flags."""
    out: dict[int, list[tuple[int, float]]] = {r.id: [] for r in requests}
    skipped = skipped if skipped is not None else []
    answers = call("Prefill", pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))
    while True:
        decided = [[(g.request_id, g.token_id) for g in a.generations] for a in answers]
        assert all(d == decided[0] for d in decided), decided  # every rank chose the same tokens
        for g in answers[0].generations:
            out[g.request_id].append((g.token_id, g.token_logprob))
            skipped.append(g.skipped)
        if not answers[0].HasField("batch"):
            return out
        answers = call("Decode", pb.DecodeRequest(batches=[answers[0].batch]))


def test_a_two_rank_shard_set_over_grpc_answers_like_one_shard(llama_dir: Path, tmp_path: Path) -> None:
    adapter = make_lora_adapter(llama_dir, tmp_path / "lora", 3, r=8, target_modules=["q_proj", "o_proj", "down_proj"])
    uds = str(tmp_path / "shard")
    procs = _start_ranks(llama_dir, uds, 2)
    sockets = [Path(f"{uds}-{rank}") for rank in range(2)]
    ranks = None
    try:
        deadline = time.time() + 120
        while not all(s.exists() for s in sockets):
            assert all(p.poll() is None for p in procs), [
                p.stdout.read().decode()[-3000:] for p in procs if p.poll() is not None
            ]
            assert time.time() < deadline, "the ranks did not open their sockets"
            time.sleep(0.1)
        ranks = _Ranks(sockets)
        discovered = ranks.stubs[0].ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
        assert list(discovered) == [f"unix://{s}" for s in sockets]
        infos = ranks.call("Info", pb.InfoRequest())
        assert {i.vocab_size for i in infos} == {320} and {i.architecture for i in infos} == {"LlamaForCausalLM"}
        assert {i.speculate for i in infos} == {3}
        warm = ranks.call("Warmup", pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
        assert {w.max_supported_total_tokens for w in warm} == {64 * 16}
        params = pb.AdapterParameters(adapter_ids=[str(adapter)])
        load = pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=pb.AdapterSource.LOCAL, adapter_index=1)
        assert all(answer.loaded for answer in ranks.call("LoadAdapter", load))
        prompts = [[1, 40, 41, 42, 43] * 3, [1, 7, 8], [1, 50, 51, 52, 53, 54, 55] * 2]
        requests = [_request(1, prompts[0], 12, 1), _request(2, prompts[1], 12), _request(3, prompts[2], 10, 1)]
        skipped: list[bool] = []
        got = _generate(ranks.call, requests, 1, skipped)
        assert any(skipped)  # drafts were kept
        assert all(a.offloaded for a in ranks.call("OffloadAdapter", pb.OffloadAdapterRequest(adapter_index=1)))
        with pytest.raises(grpc.RpcError) as err:
            ranks.call(
                "Prefill", pb.PrefillRequest(batch=pb.Batch(id=2, requests=[_request(9, prompts[0], 2, 1)], size=1))
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not loaded" in err.value.details()
        alone = _generate(ranks.call, [_request(4, prompts[1], 6)], 3)[4]  # still serving, the same tokens
        assert [t for t, _ in alone] == [t for t, _ in got[2][:6]]
        # A decode stream that only rank 0 is asked to stop: both ranks end it at the same step.
        long = pb.Batch(id=5, requests=[_request(5, prompts[1], 40)], size=1)
        pre = ranks.call("Prefill", pb.PrefillRequest(batch=long))

        def stream(rank: int) -> list[list[int]]:
            messages = [pb.DecodeRequest(batches=[pre[rank].batch], steps=30)] + [pb.DecodeRequest()] * (rank == 0)
            answers = ranks.stubs[rank].DecodeStream(iter(messages), timeout=120)
            return [[g.token_id for g in a.generations] for a in answers]

        streamed = list(ranks.pool.map(stream, range(2)))
        assert streamed[0] == streamed[1] and len(streamed[0]) < 30, streamed
        ranks.call("ClearCache", pb.ClearCacheRequest())
    finally:
        if ranks is not None:
            ranks.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    want = engine_tokens(llama_dir, [str(adapter)], [(prompts[0], 1, 12), (prompts[1], 0, 12), (prompts[2], 1, 10)])
    for rid in (1, 2, 3):
        assert [t for t, _ in got[rid]] == [t for t, _ in want[rid - 1]], rid
        assert max(abs(a - b) for (_, a), (_, b) in zip(got[rid], want[rid - 1], strict=True)) < 1e-4
