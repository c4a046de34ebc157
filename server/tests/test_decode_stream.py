"""DecodeStream: decode steps answered one by one. Over real gRPC (the service served from a thread of
this process) it gives the tokens and log-probabilities of one Decode a step; called in-process, a
stop message ends it after the step in progress, and ranks end at the same step when any of them saw
a stop. (Two real ranks: `test_tensor_parallel.py`.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from shard_process import in_process
from test_engine import make_engine
from test_grpc import request

from lorax_server.engine import Engine
from lorax_server.pb import generate_pb2 as pb
from lorax_server.server import LoraxService, cached_batch, request_from_proto

Tokens = dict[int, list[tuple[int, float]]]


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> Engine:
    return make_engine(llama_dir)


def _requests(first_id: int) -> list[pb.Request]:
    """Five requests of 1 to 9 new tokens, one that may stop at EOS, one with top tokens."""
    requests = [request(first_id + i, [1, 7 + i, 30 + 2 * i], 1 + 2 * i) for i in range(5)]
    requests[1].stopping_parameters.ignore_eos_token = False
    requests[2].top_n_tokens = 3
    return requests


def _record(out: Tokens, generations) -> None:  # noqa: ANN001
    for g in generations:
        out[g.request_id].append((g.token_id, g.token_logprob))


def test_a_stream_answers_each_step_with_the_tokens_of_one_decode_a_step(engine: Engine, tmp_path: Path) -> None:
    service = LoraxService(engine, [f"unix://{tmp_path / 'shard-0'}"], "LlamaForCausalLM")
    with in_process(service, tmp_path) as stub:
        reference: Tokens = {}
        for streamed in (False, True):
            requests = _requests(10 if streamed else 0)
            out: Tokens = {r.id: [] for r in requests}
            batch_id = 2 if streamed else 1
            pre = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))
            _record(out, pre.generations)
            batch = pre.batch
            if streamed:
                steps = list(stub.DecodeStream(iter([pb.DecodeRequest(batches=[batch], steps=100)])))
                for step in steps:
                    # One generation per running request, the batch each step left.
                    ran = {g.request_id for g in step.generations}
                    assert ran == set(batch.request_ids) and len(step.generations) == len(ran)
                    assert 0 < step.forward_ns <= step.total_ns
                    _record(out, step.generations)
                    batch = step.batch
                assert len(steps) == 8 and not steps[-1].HasField("batch")  # the longest request's 9 tokens
            else:
                while pre.HasField("batch"):
                    pre = stub.Decode(pb.DecodeRequest(batches=[pre.batch]))
                    _record(out, pre.generations)
                reference = {rid - 10 * streamed: tokens for rid, tokens in out.items()}
        assert {rid - 10: tokens for rid, tokens in out.items()} == reference

        # A call of 3 steps ends after them, its batch ready for the next call.
        requests = _requests(20)
        pre = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=3, requests=requests, size=len(requests))))
        steps = list(stub.DecodeStream(iter([pb.DecodeRequest(batches=[pre.batch], steps=3)])))
        assert len(steps) == 3 and list(steps[-1].batch.request_ids) == [22, 23, 24]  # 22 has a token left
        with pytest.raises(grpc.RpcError) as err:
            list(stub.DecodeStream(iter([pb.DecodeRequest(batches=[pb.CachedBatch(id=99)], steps=3)])))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        stub.ClearCache(pb.ClearCacheRequest())


class _Context:
    """What the handler uses of a gRPC context, for calls made in-process."""

    def invocation_metadata(self) -> tuple:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"{code}: {details}")


def _stream_with_stop(engine: Engine, batch_id: int, stop_after: int | None) -> tuple[list[int], pb.CachedBatch]:
    """Prefill a request of 40 new tokens, then a stream of up to 30 steps, with a stop message sent
    once `stop_after` answers arrived: the tokens of the prefill and of every answer, and the batch the
    last answer left."""

    async def scenario() -> tuple[list[int], pb.CachedBatch]:
        gens, batch = engine.prefill(batch_id, [request_from_proto(request(batch_id, [1, 5, 6, 7], 40))])
        tokens = [g.token_id for g in gens]
        messages: asyncio.Queue[pb.DecodeRequest] = asyncio.Queue()
        messages.put_nowait(pb.DecodeRequest(batches=[cached_batch(batch)], steps=30))

        async def caller() -> AsyncIterator[pb.DecodeRequest]:
            while True:
                yield await messages.get()

        answers = 0
        last = None
        async for answer in LoraxService(engine, [], "LlamaForCausalLM").DecodeStream(caller(), _Context()):
            answers += 1
            tokens += [g.token_id for g in answer.generations]
            last = answer.batch
            if answers == stop_after:
                messages.put_nowait(pb.DecodeRequest())
                while not messages.empty():  # until the handler's reader has taken it (and set its stop)
                    await asyncio.sleep(0)
        return tokens, last

    return asyncio.run(scenario())


def _to_the_end(engine: Engine, batch: pb.CachedBatch) -> list[int]:
    tokens = []
    while batch is not None:
        gens, kept = engine.decode([batch.id])
        tokens += [g.token_id for g in gens]
        batch = cached_batch(kept)
    return tokens


def test_a_stop_message_ends_the_stream_after_the_step_in_progress(engine: Engine) -> None:
    stopped, batch = _stream_with_stop(engine, 40, stop_after=2)
    assert len(stopped) == 1 + 2 and list(batch.request_ids) == [40]
    stopped += _to_the_end(engine, batch)
    whole, batch = _stream_with_stop(engine, 41, stop_after=None)
    assert len(whole) == 1 + 30
    whole += _to_the_end(engine, batch)
    assert stopped == whole and len(whole) == 40  # the batch went on where the stream left it


def test_ranks_end_the_stream_together_when_any_of_them_saw_a_stop(engine: Engine, monkeypatch) -> None:  # noqa: ANN001
    # Another rank has seen a stop message: the collective's minimum says so to this one.
    monkeypatch.setattr(engine.model.tp, "all_reduce_min", lambda value: min(value, 0))
    tokens, batch = _stream_with_stop(engine, 50, stop_after=None)
    assert len(tokens) == 1 + 1 and list(batch.request_ids) == [50]
    engine.clear(None)
