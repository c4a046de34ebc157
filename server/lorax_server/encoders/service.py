"""The gRPC service of a shard that serves an encoder: Info, Health, ServiceDiscovery, Warmup, Embed,
Classify. Every generation RPC is answered FAILED_PRECONDITION; ClearCache succeeds (nothing is cached).

Model work runs on the event loop's own thread, one call at a time, as in `lorax_server.server`.
"""

from __future__ import annotations

import logging

import grpc

from ..engine import HealthCheckFailed, RequestError
from ..pb import generate_pb2 as pb
from ..pb import generate_pb2_grpc as pb_grpc
from ..utils.telemetry import rpc_span
from .engine import EncoderEngine, EncoderInput, NotServed

log = logging.getLogger(__name__)

_STATUS = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotServed: grpc.StatusCode.FAILED_PRECONDITION,
    HealthCheckFailed: grpc.StatusCode.UNAVAILABLE,
}


def inputs_from_proto(inputs) -> list[EncoderInput]:  # noqa: ANN001 - repeated pb.EncoderInput
    return [EncoderInput(x.id, list(x.input_ids)) for x in inputs]


def _attributes(inputs: list[EncoderInput]) -> dict[str, int]:
    return {"batch_size": len(inputs), "tokens": sum(len(x.input_ids) for x in inputs)}


class EncoderService(pb_grpc.LoraxServiceServicer):
    def __init__(self, engine: EncoderEngine, urls: list[str], architecture: str) -> None:
        self.engine = engine
        self.urls = urls
        self.architecture = architecture

    async def _run(self, context: grpc.aio.ServicerContext, fn, *args):  # noqa: ANN001, ANN202
        """Run `fn` here, on the loop's thread; map its errors to gRPC statuses (the shard keeps serving)."""
        try:
            return fn(*args)
        except Exception as e:
            code = next((c for kind, c in _STATUS.items() if isinstance(e, kind)), None)
            if code is None:
                log.exception("shard call failed")
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            await context.abort(code, str(e))

    async def _refuse(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{self.architecture} is an encoder model: it serves embeddings/classification, not text generation",
        )

    async def Info(self, request, context):  # noqa: ANN001, ANN201, N802
        model = self.engine.model
        return pb.InfoResponse(
            requires_padding=False,
            dtype=str(model.dtype).removeprefix("torch."),
            device_type=model.device.type,
            block_size=0,  # no KV cache
            vocab_size=model.vocab_size,
            max_position_embeddings=self.engine.max_input_length,
            eos_token_ids=list(model.config.eos_token_ids),
            supports_adapters=False,
            architecture=self.architecture,
            speculate=0,
            prefix_caching=False,
            supports_generation=False,
            supports_embeddings=True,
            supports_classification=self.engine.supports_classification,
            embedding_dim=self.engine.embedding_dim,
        )

    async def Health(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._run(context, self.engine.health)
        return pb.HealthResponse()

    async def ServiceDiscovery(self, request, context):  # noqa: ANN001, ANN201, N802
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    async def Warmup(self, request, context):  # noqa: ANN001, ANN201, N802
        args = (request.max_input_length, request.max_prefill_tokens, request.max_total_tokens)
        tokens = await self._run(context, self.engine.warmup, *args)
        return pb.WarmupResponse(max_supported_total_tokens=tokens)

    async def Embed(self, request, context):  # noqa: ANN001, ANN201, N802
        inputs = inputs_from_proto(request.inputs)
        with rpc_span("embed", context.invocation_metadata(), **_attributes(inputs)):
            vectors = await self._run(context, self.engine.embed, inputs)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(request_id=x.id, values=v) for x, v in zip(inputs, vectors, strict=True)]
        )

    async def Classify(self, request, context):  # noqa: ANN001, ANN201, N802
        inputs = inputs_from_proto(request.inputs)
        with rpc_span("classify", context.invocation_metadata(), **_attributes(inputs)):
            results = await self._run(context, self.engine.classify, inputs)
        return pb.ClassifyResponse(
            classify_prediction_lists=[
                pb.ClassifyPredictionList(request_id=r.request_id, predictions=r.labels, scores=r.scores)
                for r in results
            ]
        )

    async def ClearCache(self, request, context):  # noqa: ANN001, ANN201, N802
        return pb.ClearCacheResponse()  # nothing is cached between calls

    # Generation and adapters: not served.
    async def Prefill(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._refuse(context)

    async def Decode(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._refuse(context)

    async def DecodeStream(self, requests, context):  # noqa: ANN001, ANN201, N802
        await self._refuse(context)
        yield pb.DecodeResponse()  # never reached (abort raises): the yield makes this a streaming handler

    async def FilterBatch(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._refuse(context)

    async def DownloadAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._refuse(context)

    async def LoadAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._refuse(context)

    async def OffloadAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._refuse(context)

    async def CompileGrammar(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._refuse(context)
