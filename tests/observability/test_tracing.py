"""Spans, read from the SDK's in-memory exporter: request, stages, batch with links, upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from embedplex.backends.fake import FakeBackend
from embedplex.observability import Telemetry, upstream_span
from embedplex.observability.logs import JsonFormatter
from embedplex.observability.tracing import (
    SHUTDOWN_TIMEOUT_S,
    build_tracer_provider,
    shutdown_spans,
)

from .conftest import MODEL, serve, settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def traced() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Telemetry.from_settings(settings(), span_exporter=exporter), exporter


async def test_request_span_honours_traceparent_and_holds_the_stages() -> None:
    telemetry, exporter = traced()
    async with serve(telemetry=telemetry) as srv:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-request-id": "req-1"}
        r = await srv.client.post("/v1/embeddings", json={"input": ["a", "b"]}, headers=headers)
        assert r.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans["POST /v1/embeddings"]
    assert request.kind is SpanKind.SERVER
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert request.parent is not None
    assert format(request.parent.span_id, "016x") == PARENT_ID
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["embedplex.model"] == MODEL
    assert request.attributes["embedplex.inputs"] == 2
    assert request.attributes["embedplex.request_id"] == "req-1"
    for stage in ("tokenize", "queue", "inference"):
        span = spans[stage]
        assert span.parent is not None
        assert span.parent.span_id == request.context.span_id, stage
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= span.end_time
    # Stages happen in order within the request.
    assert spans["tokenize"].end_time <= spans["inference"].end_time  # type: ignore[operator]
    batch = spans["batch inference"]
    assert batch.parent is None  # a root of its own, linked to the request
    assert [link.context.span_id for link in batch.links] == [request.context.span_id]
    assert batch.attributes is not None
    assert batch.attributes["embedplex.batch_size"] == 2


async def test_one_batch_span_links_every_request_in_it() -> None:
    telemetry, exporter = traced()
    async with serve(backend=FakeBackend(delay=0.2), telemetry=telemetry) as srv:
        # The first request occupies the backend; the next two queue and share one batch.
        first = asyncio.create_task(srv.client.post("/embed", json={"inputs": "first"}))
        await asyncio.sleep(0.05)
        rest = [srv.client.post("/embed", json={"inputs": t}) for t in ("second", "third")]
        responses = await asyncio.gather(first, *rest)
        assert [r.status_code for r in responses] == [200, 200, 200]
    spans = exporter.get_finished_spans()
    requests = {s.context.span_id for s in spans if s.name == "POST /embed"}
    batches = [s for s in spans if s.name == "batch inference"]
    assert len(requests) == 3
    shared = [b for b in batches if b.attributes and b.attributes["embedplex.batch_size"] == 2]
    assert len(shared) == 1
    linked = {link.context.span_id for link in shared[0].links}
    assert len(linked) == 2
    assert linked < requests


async def test_failed_request_span_is_an_error() -> None:
    telemetry, exporter = traced()
    backend = FakeBackend()
    backend.fail_next = 1
    async with serve(backend=backend, telemetry=telemetry) as srv:
        assert (await srv.client.post("/embed", json={"inputs": "x"})).status_code == 424
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert not spans["batch inference"].status.is_ok
    assert spans["POST /embed"].attributes is not None
    assert spans["POST /embed"].attributes["http.response.status_code"] == 424


async def test_quiet_paths_are_traced_only_when_they_fail() -> None:
    exporter = InMemorySpanExporter()
    key = "sk-obs-traced-0123456789abcdef"
    telemetry = Telemetry.from_settings(settings(api_key=key), span_exporter=exporter)
    async with serve(settings(api_key=key), telemetry=telemetry) as srv:
        auth = {"authorization": f"Bearer {key}"}
        assert (await srv.client.get("/metrics", headers=auth)).status_code == 200
        assert (await srv.client.get("/health/ready")).status_code == 200
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        assert (await srv.client.get("/metrics", headers=headers)).status_code == 401
        assert (await srv.client.get("/metricsfoo", headers=auth)).status_code == 404
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["GET /metrics", "GET unmatched"]
    (refused,) = [s for s in spans if s.name == "GET /metrics"]
    assert refused.attributes is not None
    assert refused.attributes["http.response.status_code"] == 401
    assert format(refused.context.trace_id, "032x") == TRACE_ID  # its traceparent honoured
    assert refused.start_time is not None and refused.end_time is not None
    assert refused.start_time <= refused.end_time


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "embedplex.access"]


async def test_access_lines_carry_the_request_spans_ids(caplog: pytest.LogCaptureFixture) -> None:
    """A traced request's log line names its trace and span (a log line leads to its spans),
    in both formats; an untraced server's lines carry neither."""
    caplog.set_level(logging.INFO)
    telemetry, exporter = traced()
    async with serve(telemetry=telemetry) as srv:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        assert (await srv.client.post("/embed", json={"inputs": "x"}, headers=headers)).is_success
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "POST /embed"]
    (record,) = access_records(caplog)
    assert record.__dict__["trace_id"] == TRACE_ID
    assert record.__dict__["span_id"] == format(span.context.span_id, "016x")
    assert f"trace={TRACE_ID}" in record.getMessage()
    line = json.loads(JsonFormatter().format(record))
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, format(span.context.span_id, "016x"))
    caplog.clear()
    async with serve() as srv:  # no tracer
        assert (await srv.client.post("/embed", json={"inputs": "x"})).is_success
    (untraced,) = access_records(caplog)
    assert "trace_id" not in untraced.__dict__ and "trace=" not in untraced.getMessage()


@contextmanager
def otlp_collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A real OTLP/HTTP collector on 127.0.0.1: it takes every export (an empty protobuf
    answer is a valid ExportTraceServiceResponse) and keeps (path, body)."""
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


async def test_disable_spans_keeps_the_export_and_leaves_the_ids_out_of_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--disable-spans means what TEI's flag means: no spans in log lines. It turned tracing
    off altogether, even with --otlp-endpoint; spans now still reach the collector."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    caplog.set_level(logging.INFO)
    assert Telemetry.from_settings(settings()).tracer is None  # no endpoint: tracing off
    with otlp_collector() as (endpoint, received):
        s = settings(otlp_endpoint=endpoint, otlp_protocol="http", disable_spans=True)
        async with serve(s) as srv:
            assert srv.telemetry.tracer is not None
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            r = await srv.client.post("/embed", json={"inputs": "x"}, headers=headers)
            assert r.status_code == 200
        # The lifespan's end flushed the batch processor: the request's span was exported.
        exported = b"".join(body for path, body in received if path == "/v1/traces")
    assert b"POST /embed" in exported
    assert bytes.fromhex(TRACE_ID) in exported  # the caller's trace, continued
    (record,) = access_records(caplog)
    assert "trace_id" not in record.__dict__ and "span_id" not in record.__dict__
    assert "trace=" not in record.getMessage()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_otlp_endpoint_builds_an_exporter(protocol: str) -> None:
    pytest.importorskip(f"opentelemetry.exporter.otlp.proto.{protocol}.trace_exporter")
    s = settings(otlp_endpoint="http://127.0.0.1:4317", otlp_protocol=protocol)
    provider = build_tracer_provider(s)
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "embedplex"
    provider.shutdown()


@contextmanager
def black_hole() -> Iterator[int]:
    """A port whose connections the kernel completes and nobody ever answers (never accepted)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_a_collector_that_never_answers_does_not_hold_shutdown(protocol: str) -> None:
    """The lifespan's shutdown waits SHUTDOWN_TIMEOUT_S at most for the last spans, then drops
    them (the SDK's own bounds: 10 s an export, 30 s a shutdown: 25 s measured before)."""
    pytest.importorskip(f"opentelemetry.exporter.otlp.proto.{protocol}.trace_exporter")
    with black_hole() as port:
        s = settings(otlp_endpoint=f"http://127.0.0.1:{port}", otlp_protocol=protocol)
        async with serve(s) as srv:
            for i in range(5):
                r = await srv.client.post("/embed", json={"inputs": f"text {i}"})
                assert r.status_code == 200
            assert srv.telemetry.tracer is not None
            stopping = time.monotonic()
        took = time.monotonic() - stopping
    assert took < SHUTDOWN_TIMEOUT_S + 1.5, took


async def test_span_shutdown_gives_up_after_its_bound(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export that hangs (whatever the exporter's own timeout) is left behind with one
    warning; the loop is free meanwhile; and when it ends after all, its thread ends quietly
    (it set the result of the wait that had given up: InvalidStateError in the thread)."""
    release = threading.Event()
    raised: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))

    class Hanging(InMemorySpanExporter):
        def shutdown(self) -> None:
            release.wait(30)

    provider = build_tracer_provider(settings(), Hanging())
    assert provider is not None
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    start = time.monotonic()
    try:
        assert await shutdown_spans(provider, 0.3) is False
    finally:
        release.set()
        ticker.cancel()
    assert time.monotonic() - start < 1.0
    assert ticks >= 10  # the wait ran off the event loop
    for thread in [t for t in threading.enumerate() if t.name == "span-shutdown"]:
        thread.join(5)
    assert raised == []
    (warning,) = [r for r in caplog.records if "took no spans" in r.getMessage()]
    assert warning.levelno == logging.WARNING


def test_upstream_span_api() -> None:
    telemetry, exporter = traced()
    tracer = telemetry.tracer
    assert tracer is not None
    with upstream_span(None, "openai", 3) as nothing:
        assert nothing is None
    with tracer.start_as_current_span("request 1") as one:
        pass
    with tracer.start_as_current_span("request 2") as two:
        pass
    first, second = one.get_span_context(), two.get_span_context()
    # Under the request that opened the batch, linked to the others (repeats counted once).
    with (
        tracer.start_as_current_span("unrelated"),  # the current span is not the parent
        upstream_span(tracer, "openai", 3, [first, first, second]) as span,
    ):
        assert span is not None
    with upstream_span(tracer, "probe", 1) as span:
        assert span is not None
    spans = {s.name: s for s in exporter.get_finished_spans()}
    upstream = spans["upstream openai"]
    assert upstream.kind is SpanKind.CLIENT
    assert upstream.parent is not None
    assert upstream.parent.span_id == first.span_id
    assert upstream.context.trace_id == first.trace_id
    assert [link.context for link in upstream.links] == [second]
    assert upstream.attributes is not None
    assert upstream.attributes["embedplex.inputs"] == 3
    assert upstream.attributes["embedplex.requests"] == 2
    assert spans["upstream probe"].parent is None
