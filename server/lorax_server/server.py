"""The shard's gRPC service (grpc.aio on a unix socket): converts messages and calls the engine.

Model work (Health's forward pass included) runs on the event loop's own thread, one call at a time,
so steps never overlap (the engine is not thread-safe); an RPC that arrives during a step is taken up
when it ends, between two steps of a DecodeStream too. Slow adapter fetches and grammar compilation
run on worker threads meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from .adapters.loader import AdapterLoadError
from .adapters.manager import AdapterBudgetExceeded, AdapterInUse, AdapterRequest, Modules
from .adapters.sources import AdapterFetchError, AdapterSource
from .batch import Batch, RequestIn
from .encoders.engine import EncoderEngine
from .encoders.service import EncoderService
from .engine import BatchNotFound, Engine, HealthCheckFailed, NotWarmedUp, RequestError
from .grammar import GrammarError, GrammarKind, GrammarSpec
from .kv_cache import OutOfBlocks
from .outputs import GenerationOut, StepTimings, TokenList
from .pb import generate_pb2 as pb
from .pb import generate_pb2_grpc as pb_grpc
from .sampling import SamplingParams
from .utils.telemetry import rpc_span

log = logging.getLogger(__name__)

# Engine and adapter exceptions → gRPC status codes. Anything else is INTERNAL and logged.
_STATUS = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    GrammarError: grpc.StatusCode.INVALID_ARGUMENT,
    BatchNotFound: grpc.StatusCode.NOT_FOUND,
    OutOfBlocks: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotWarmedUp: grpc.StatusCode.FAILED_PRECONDITION,
    HealthCheckFailed: grpc.StatusCode.UNAVAILABLE,
    AdapterLoadError: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterBudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AdapterInUse: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterFetchError: grpc.StatusCode.UNAVAILABLE,  # refined by the error's kind below
}
_FETCH_STATUS = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def _status_of(e: Exception) -> grpc.StatusCode | None:
    if isinstance(e, AdapterFetchError):
        return _FETCH_STATUS.get(e.kind, grpc.StatusCode.UNAVAILABLE)
    return next((code for kind, code in _STATUS.items() if isinstance(e, kind)), None)


def adapter_request(params: pb.AdapterParameters, source: int, api_token: str | None) -> AdapterRequest:
    ids = tuple(params.adapter_ids)
    if not ids or not all(ids):
        raise RequestError("adapter_parameters.adapter_ids must name at least one adapter")
    return AdapterRequest(
        ids=ids,
        source=AdapterSource.from_proto(source),
        weights=tuple(params.weights),
        merge_strategy=params.merge_strategy,
        density=params.density if params.density > 0 else 1.0,
        majority_sign_method=params.majority_sign_method,
        api_token=api_token or None,
    )


def grammar_from_proto(g: pb.Grammar) -> GrammarSpec | None:
    """The request's grammar; None when it has none (or GRAMMAR_TYPE_NONE)."""
    try:
        kind = GrammarKind(g.type)
    except ValueError:
        raise RequestError(f"unknown grammar type {g.type}") from None
    return None if kind == GrammarKind.NONE else GrammarSpec(kind, g.value)


def request_from_proto(r: pb.Request) -> RequestIn:
    p, s = r.parameters, r.stopping_parameters
    return RequestIn(
        id=r.id,
        input_ids=list(r.input_ids),
        sampling=SamplingParams.from_proto(p),
        max_new_tokens=s.max_new_tokens,
        stop_sequences=list(s.stop_sequences),
        ignore_eos=s.ignore_eos_token,
        prefill_logprobs=r.prefill_logprobs,
        top_n_tokens=r.top_n_tokens,
        adapter_index=r.adapter_index,
        grammar=grammar_from_proto(r.grammar) if r.HasField("grammar") else None,
    )


def _tokens(t: TokenList) -> pb.Tokens:
    return pb.Tokens(ids=t.ids, logprobs=t.logprobs, texts=t.texts, is_special=t.special)


def generation_to_proto(g: GenerationOut) -> pb.Generation:
    msg = pb.Generation(
        request_id=g.request_id,
        token_id=g.token_id,
        token_logprob=g.logprob,
        token_text=g.text,
        token_is_special=g.special,
        skipped=g.skipped,
    )
    if g.prefill is not None:
        msg.prefill_tokens.CopyFrom(_tokens(g.prefill))
    if g.top_tokens is not None:
        msg.top_tokens.CopyFrom(_tokens(g.top_tokens))
    if g.finished is not None:
        f = g.finished
        msg.generated_text.CopyFrom(
            pb.GeneratedText(text=f.text, generated_tokens=f.generated_tokens, finish_reason=int(f.reason), seed=f.seed)
        )
    return msg


def cached_batch(batch: Batch | None) -> pb.CachedBatch | None:
    if batch is None:
        return None
    ids = batch.request_ids  # generating rows and requests still being prefilled (chunked prefill)
    return pb.CachedBatch(id=batch.id, request_ids=ids, size=len(ids), max_tokens=batch.max_tokens)


def _decode_response(
    gens: list[GenerationOut], batch: Batch | None, t: StepTimings, start_ns: int
) -> pb.DecodeResponse:
    """A Decode answer: the generations, the batch they left, and the timings (`t`, the engine's)."""
    return pb.DecodeResponse(
        generations=[generation_to_proto(g) for g in gens],
        batch=cached_batch(batch),
        concat_ns=t.concat_ns,
        forward_ns=t.forward_ns,
        decode_ns=t.decode_ns,
        total_ns=time.perf_counter_ns() - start_ns,
    )


async def _set_on_message(messages, event: asyncio.Event) -> None:  # noqa: ANN001
    """Sets `event` when a message arrives on the stream (its end is not one)."""
    async for _ in messages:
        event.set()
        return


class LoraxService(pb_grpc.LoraxServiceServicer):
    def __init__(self, engine: Engine, urls: list[str], architecture: str) -> None:
        self.engine = engine
        self.urls = urls
        self.architecture = architecture
        # Engine calls run on the event loop's own thread, one at a time, blocking it for a step: handing
        # each step to a worker thread and back cost 15-20% of tokens/s over HTTP on 2 cores (the
        # engine idled between RPCs; bench/RESULTS.md, session 11). Other RPCs wait at most a step.
        # Adapter fetching/validation/merging runs here so decode steps go on meanwhile.
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-loader")
        # Grammar compilation too (xgrammar releases the GIL while it compiles).
        self._compiler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")

    async def _run(self, context: grpc.aio.ServicerContext, fn, *args, on_loader: bool = False, executor=None):  # noqa: ANN001, ANN202
        """Run `fn` as engine work (here, on the loop's thread), or on a loader thread, or on `executor`;
        map errors to gRPC statuses (the shard keeps serving)."""
        executor = executor or (self._loader if on_loader else None)
        try:
            if executor is None:
                return fn(*args)
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except Exception as e:
            code = _status_of(e)
            if code is None:  # a bug or a device failure: report it, keep the shard alive
                log.exception("shard call failed")
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            await context.abort(code, str(e).strip("'\""))

    def _timed(self, fn, *args):  # noqa: ANN001, ANN202
        """Call an engine step and return its result with that step's timings, read before a later step
        can replace them."""
        gens, batch = fn(*args)
        return gens, batch, self.engine.timings

    async def Info(self, request, context):  # noqa: ANN001, ANN201, N802
        model = self.engine.model
        cfg = model.config
        return pb.InfoResponse(
            requires_padding=False,
            dtype=str(model.dtype).removeprefix("torch."),
            device_type=model.device.type,
            window_size=cfg.sliding_window,
            block_size=self.engine.cache_config.block_size,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_position_embeddings,
            eos_token_ids=sorted(self.engine.eos_ids),
            supports_adapters=self.engine.adapters is not None,
            architecture=self.architecture,
            quantize=getattr(model, "quantize", None),
            speculate=self.engine.speculator.config.tokens if self.engine.speculator is not None else 0,
            # Keys salted with the prompt's length are shared only by prompts of one length: the
            # router is told nothing is shared rather than over-counting.
            prefix_caching=self.engine.prefix_caching and model.length_dependent_above is None,
            supports_generation=True,
        )

    async def _no_encoder_calls(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{self.architecture} generates text: Embed and Classify are served for encoder models (BERT family)",
        )

    async def Embed(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._no_encoder_calls(context)

    async def Classify(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._no_encoder_calls(context)

    async def Health(self, request, context):  # noqa: ANN001, ANN201, N802
        # A forward pass as engine work, so it waits for the running step and never overlaps it.
        await self._run(context, self.engine.health)
        return pb.HealthResponse()

    async def ServiceDiscovery(self, request, context):  # noqa: ANN001, ANN201, N802
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    async def ClearCache(self, request, context):  # noqa: ANN001, ANN201, N802
        await self._run(context, self.engine.clear, request.id if request.HasField("id") else None)
        return pb.ClearCacheResponse()

    async def Warmup(self, request, context):  # noqa: ANN001, ANN201, N802
        tokens = await self._run(
            context,
            self.engine.warmup,
            request.max_input_length,
            request.max_prefill_tokens,
            request.max_total_tokens,
        )
        return pb.WarmupResponse(max_supported_total_tokens=tokens)

    async def Prefill(self, request, context):  # noqa: ANN001, ANN201, N802
        start = time.perf_counter_ns()
        requests = [request_from_proto(r) for r in request.batch.requests]
        attributes = {
            "batch_id": request.batch.id,
            "batch_size": len(requests),
            "prefill_tokens": sum(len(r.input_ids) for r in requests),
        }
        with rpc_span("prefill", context.invocation_metadata(), **attributes) as span:
            gens, batch, t = await self._run(context, self._timed, self.engine.prefill, request.batch.id, requests)
            span.set_attribute("forward_ns", t.forward_ns)
        return pb.PrefillResponse(
            generations=[generation_to_proto(g) for g in gens],
            batch=cached_batch(batch),
            forward_ns=t.forward_ns,
            decode_ns=t.decode_ns,
            total_ns=time.perf_counter_ns() - start,
        )

    def _decode_steps(self, batch_ids: list[int], steps: int):  # noqa: ANN202
        """Up to `steps` decode steps, each on the batch the one before left (the engine drops finished
        requests at once), fewer when every request finishes; their generations in order and their
        summed timings."""
        gens, batch, t = self._timed(self.engine.decode, batch_ids)
        total = dataclasses.replace(t)
        for _ in range(steps - 1):
            if batch is None:
                break
            more, batch, t = self._timed(self.engine.decode, [batch.id])
            gens += more
            total.concat_ns += t.concat_ns
            total.forward_ns += t.forward_ns
            total.decode_ns += t.decode_ns
        return gens, batch, total

    async def Decode(self, request, context):  # noqa: ANN001, ANN201, N802
        start = time.perf_counter_ns()
        steps = max(request.steps, 1)
        attributes = {"batches": len(request.batches), "batch_size": sum(b.size for b in request.batches)}
        with rpc_span("decode", context.invocation_metadata(), steps=steps, **attributes) as span:
            ids = [b.id for b in request.batches]
            gens, batch, t = await self._run(context, self._decode_steps, ids, steps)
            span.set_attribute("forward_ns", t.forward_ns)
        return _decode_response(gens, batch, t, start)

    async def DecodeStream(self, requests, context):  # noqa: ANN001, ANN201, N802
        """Decode steps answered one by one (see the proto). A message after the first one sets `stop`,
        read between steps; ranks end together at the first step after which any of them saw one."""
        first = await anext(requests, None)
        if first is None:
            return
        stop = asyncio.Event()
        watcher = asyncio.create_task(_set_on_message(requests, stop))
        try:
            ids = [b.id for b in first.batches]
            size = sum(b.size for b in first.batches)
            steps = max(first.steps, 1)
            for step in range(steps):
                start = time.perf_counter_ns()
                with rpc_span("decode", context.invocation_metadata(), batches=len(ids), batch_size=size) as span:
                    gens, batch, t = await self._run(context, self._timed, self.engine.decode, ids)
                    span.set_attribute("forward_ns", t.forward_ns)
                yield _decode_response(gens, batch, t, start)
                if batch is None or step == steps - 1 or not self._all_ranks_go_on(not stop.is_set()):
                    return
                ids, size = [batch.id], len(batch.request_ids)
        finally:
            watcher.cancel()

    def _all_ranks_go_on(self, go_on: bool) -> bool:
        """Whether every rank goes on to another step: ranks may see a stop message at different steps,
        but must run the same ones (their forward passes meet in collectives)."""
        tp = getattr(self.engine.model, "tp", None)  # the transformers fallback runs on one rank
        return go_on if tp is None else tp.all_reduce_min(int(go_on)) == 1

    async def FilterBatch(self, request, context):  # noqa: ANN001, ANN201, N802
        batch = await self._run(context, self.engine.filter, request.batch_id, list(request.request_ids))
        if batch is None:
            return pb.FilterBatchResponse(batch=pb.CachedBatch(id=request.batch_id, size=0, max_tokens=0))
        return pb.FilterBatchResponse(batch=cached_batch(batch))

    def _chat_template(self, req: AdapterRequest) -> pb.AdapterChatTemplate | None:
        template = self.engine.adapter_chat_template(req)
        if template is None:
            return None
        return pb.AdapterChatTemplate(
            template=template.template, bos_token=template.bos_token, eos_token=template.eos_token
        )

    def _downloaded(self, req: AdapterRequest) -> tuple[float, pb.AdapterChatTemplate | None]:
        return self.engine.download_adapter(req), self._chat_template(req)

    async def DownloadAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        req = await self._run(
            context, adapter_request, request.adapter_parameters, request.adapter_source, request.api_token
        )
        with rpc_span("download_adapter", context.invocation_metadata(), adapter=req.describe()):
            # A small local adapter is read right here, between steps; anything slower on a loader thread,
            # so decode steps go on meanwhile.
            quick = self.engine.adapter_is_quick(req)
            fraction, template = await self._run(context, self._downloaded, req, on_loader=not quick)
        return pb.DownloadAdapterResponse(downloaded=True, memory_fraction=fraction, chat_template=template)

    async def LoadAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        """Fetches the adapter when it is not on the host yet, so one call can stand for DownloadAdapter
        and LoadAdapter (the router's path for a new adapter while a slot is free)."""

        def prepare() -> tuple[Modules, pb.AdapterChatTemplate | None]:
            return self.engine.prepare_adapter(req), self._chat_template(req)

        index = request.adapter_index
        req = await self._run(
            context, adapter_request, request.adapter_parameters, request.adapter_source, request.api_token
        )
        with rpc_span("load_adapter", context.invocation_metadata(), adapter=req.describe(), index=index):
            quick = self.engine.adapter_is_quick(req)
            if await self._run(context, self.engine.adapter_loaded, index, req):
                loaded = True
                fraction, template = await self._run(context, self._downloaded, req, on_loader=not quick)
            else:
                modules, template = await self._run(context, prepare, on_loader=not quick)
                fraction = self.engine.adapter_memory_fraction(modules)
                loaded = await self._run(context, self.engine.install_adapter, index, req, modules, request.if_fits)
        return pb.LoadAdapterResponse(loaded=loaded, memory_fraction=fraction, chat_template=template)

    async def CompileGrammar(self, request, context):  # noqa: ANN001, ANN201, N802
        def compile_grammar() -> None:
            spec = grammar_from_proto(request.grammar)
            if spec is None:
                raise RequestError("CompileGrammar needs a grammar (its type is GRAMMAR_TYPE_NONE)")
            self.engine.compile_grammar(spec)

        with rpc_span("compile_grammar", context.invocation_metadata(), grammar_type=request.grammar.type):
            await self._run(context, compile_grammar, executor=self._compiler)
        return pb.CompileGrammarResponse()

    async def OffloadAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        offloaded = await self._run(context, self.engine.offload_adapter, request.adapter_index)
        return pb.OffloadAdapterResponse(offloaded=offloaded)


def shard_socket(uds_path: str, rank: int) -> str:
    return f"{uds_path}-{rank}"


async def serve(engine: Engine | EncoderEngine, architecture: str, uds_path: str, rank: int, world_size: int) -> None:
    """Listen on `unix://{uds_path}-{rank}` until cancelled (SIGINT/SIGTERM). An encoder's engine gets the
    encoder service (Embed, Classify), any other the generating one."""
    urls = [f"unix://{shard_socket(uds_path, r)}" for r in range(world_size)]
    socket_path = Path(shard_socket(uds_path, rank))
    if socket_path.exists():
        socket_path.unlink()
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", 256 * 2**20),
            ("grpc.max_receive_message_length", 256 * 2**20),
        ]
    )
    if isinstance(engine, EncoderEngine):
        servicer: pb_grpc.LoraxServiceServicer = EncoderService(engine, urls, architecture)
    else:
        servicer = LoraxService(engine, urls, architecture)
    pb_grpc.add_LoraxServiceServicer_to_server(servicer, server)
    server.add_insecure_port(urls[rank])
    await server.start()
    log.info(
        "shard %d/%d serving on %s (torch %s, %d threads)",
        rank,
        world_size,
        urls[rank],
        torch.__version__,
        torch.get_num_threads(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shard %d stopping", rank)
    finally:
        await server.stop(grace=1)
        socket_path.unlink(missing_ok=True)
