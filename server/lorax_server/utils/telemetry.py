"""Traces of the shard's steps. The router sends its trace context (W3C `traceparent`) in each call's
gRPC metadata; each traced RPC opens a span under it, so the shard's prefill and decode spans sit below
the router's batch step spans in one trace. With `--otlp-endpoint` spans are exported over OTLP/gRPC in
batches (`OTEL_BSP_*` variables tune them); without it the tracer is OpenTelemetry's no-op one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_provider = None


def setup(otlp_endpoint: str | None, rank: int) -> None:
    """Export this process's spans to `otlp_endpoint` (e.g. `http://collector:4317`); no-op without one."""
    global _provider
    if not otlp_endpoint:
        return
    # Imported here: the SDK and the exporter are only needed when traces leave the process.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": "lorax-server", "lorax.rank": rank})
    provider = TracerProvider(resource=resource)
    insecure = not otlp_endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure)))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("exporting traces to %s", otlp_endpoint)


def shutdown() -> None:
    """Flush the spans not exported yet."""
    if _provider is not None:
        _provider.shutdown()


@contextmanager
def rpc_span(name: str, metadata: Iterable[tuple[str, str | bytes]] | None, **attributes: int | str) -> Iterator[Span]:
    """A span for one RPC, child of the caller's span when its metadata carries a trace context."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    parent = _PROPAGATOR.extract(carrier)
    tracer = trace.get_tracer("lorax_server")
    with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes) as span:
        yield span
