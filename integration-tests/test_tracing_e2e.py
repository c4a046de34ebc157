"""Traces end to end: with `--otlp-endpoint` the router and the shard export OpenTelemetry spans.
A real OTLP/gRPC collector (the `opentelemetry-proto` TraceService, run here) receives one
request's spans; their parent links hold across the HTTP caller, the router and the gRPC hop to
the shard, and the JSON log lines carry the trace id."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import requests
from conftest import free_port, launch
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

# The caller's own trace (W3C traceparent): the router's request span must join it.
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span with the `service.name` of its resource."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, trace_pb2.Span]] = []

    def Export(self, request, context):  # noqa: ANN001, ANN201, N802
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                service = attributes.get("service.name", "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[tuple[str, trace_pb2.Span]]:
        with self.lock:
            return list(self.spans)


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield servicer, port
    server.stop(grace=None)


def find(spans: list[tuple[str, trace_pb2.Span]], service: str, name: str) -> list[trace_pb2.Span]:
    return [s for svc, s in spans if svc == service and s.name == name]


def attribute(span: trace_pb2.Span, key: str) -> int | str | None:
    for a in span.attributes:
        if a.key == key:
            value = a.value
            return value.int_value if value.HasField("int_value") else value.string_value
    return None


def wait_for(collector: Collector, ready, timeout: float = 60.0) -> list[tuple[str, trace_pb2.Span]]:  # noqa: ANN001
    deadline = time.time() + timeout
    while True:
        spans = collector.snapshot()
        if ready(spans) or time.time() > deadline:
            return spans
        time.sleep(0.1)


def test_one_request_is_traced_across_router_and_shard(
    llama_dir: Path, tmp_path: Path, collector: tuple[Collector, int]
) -> None:
    receiver, port = collector
    # Export every 100 ms (both SDKs read this), so the test does not wait for the default 5 s.
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
    endpoint = f"http://127.0.0.1:{port}"
    with launch(llama_dir, tmp_path, "--otlp-endpoint", endpoint, "--json-output", env=env) as server:
        answer = requests.post(
            f"{server.url}/generate",
            json={"inputs": "hello world", "parameters": {"max_new_tokens": 3, "ignore_eos_token": True}},
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text

        def complete(spans: list[tuple[str, trace_pb2.Span]]) -> bool:
            # The launcher relays the router's log lines asynchronously: wait for the line too.
            return (
                len(find(spans, "lorax-server", "decode")) >= 2
                and find(spans, "lorax-router", "request")
                and find(spans, "lorax-router", "queue")
                and f"trace_id={CALLER_TRACE}" in server.log()
            )

        spans = wait_for(receiver, complete)
        log = server.log()

    by_id = {s.span_id: (svc, s) for svc, s in spans}
    requests_ = [s for s in find(spans, "lorax-router", "request") if s.trace_id.hex() == CALLER_TRACE]
    assert len(requests_) == 1, [(svc, s.name, s.trace_id.hex()) for svc, s in spans]
    request = requests_[0]
    # The router's request span continues the caller's trace, under the caller's span.
    assert request.parent_span_id.hex() == CALLER_SPAN
    assert attribute(request, "url.path") == "/generate"
    # Validation and the queue wait are its children.
    for name in ("validation", "queue"):
        children = [s for s in find(spans, "lorax-router", name) if s.parent_span_id == request.span_id]
        assert len(children) == 1, name
        assert children[0].trace_id == request.trace_id
    queue = next(s for s in find(spans, "lorax-router", "queue") if s.parent_span_id == request.span_id)
    assert queue.end_time_unix_nano <= request.end_time_unix_nano

    # Each batch step is a trace of its own, linked to the request it served; the shard's span
    # for the same step is its child, across the gRPC call.
    for step in ("prefill", "decode"):
        router_steps = [
            s for s in find(spans, "lorax-router", step) if any(link.span_id == request.span_id for link in s.links)
        ]
        assert router_steps, f"no router {step} span links to the request"
        assert attribute(router_steps[0], "batch_size") == 1
        shard_spans = 0
        for router_step in router_steps:
            shard_steps = [s for s in find(spans, "lorax-server", step) if s.parent_span_id == router_step.span_id]
            # A prefill has one shard span; a decode call one per step it ran, up to the steps it asked for.
            most = 1 if step == "prefill" else attribute(router_step, "steps")
            assert 1 <= len(shard_steps) <= most, f"shard {step} spans under router {step} span"
            for shard_step in shard_steps:
                assert shard_step.trace_id == router_step.trace_id
                assert by_id[shard_step.parent_span_id][0] == "lorax-router"
                assert attribute(shard_step, "batch_size") == 1
            shard_spans += len(shard_steps)
        if step == "decode":
            assert shard_spans >= 2, "every decode step of the request is traced"

    # JSON log lines written inside the request carry its trace id (re-logged by the launcher).
    assert f"trace_id={CALLER_TRACE}" in log, log[-3000:]
