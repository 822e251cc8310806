"""OpenTelemetry spans: a per-app tracer, post-hoc stage spans and one span per batch.

Tracing is off (``Telemetry.tracer is None``) unless an OTLP endpoint or an exporter is given;
callers test for ``None``, so a disabled tracer costs one branch. ``--disable-spans`` does not
turn it off: as TEI's flag of that name, it only leaves the trace ids out of log lines
(``api/observe.py``); to export no spans, give no endpoint. Queue, inference and batch spans
are written after the fact from the timestamps the batcher already keeps, instead of holding
spans open across tasks and threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
)

from embedplex import __version__
from embedplex.batching import BatchStats, Item, NullObserver
from embedplex.observability.log_throttle import throttle_span_export_logs

if TYPE_CHECKING:
    # Annotations only: observability sits below the configuration, which imports the
    # providers, which report here.
    from embedplex.config import Settings

logger = logging.getLogger(__name__)

# A collector that is down, or accepts and never answers, must not hold the server: one export
# gives up after EXPORT_TIMEOUT_S (the SDK's default is 10 s, retries included), and shutdown
# waits at most SHUTDOWN_TIMEOUT_S for the last spans (``shutdown_spans``).
EXPORT_TIMEOUT_S = 3.0
SHUTDOWN_TIMEOUT_S = 3.0

# time.perf_counter() instants (what the batcher stamps) -> epoch nanoseconds (what OTel wants).
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()

AttrValue = str | int | float | bool


def to_epoch_ns(perf: float) -> int:
    return int(perf * 1e9) + _EPOCH_OFFSET_NS


def build_tracer_provider(
    settings: Settings, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """The app's tracer provider, or None when spans are off.

    ``exporter`` (tests: ``InMemorySpanExporter``) is used as is, synchronously; otherwise
    ``settings.otlp_endpoint`` gets a batching OTLP exporter over gRPC or HTTP.
    """
    if exporter is None and not settings.otlp_endpoint:
        return None
    resource = Resource.create(
        {"service.name": settings.otlp_service_name, "service.version": __version__}
    )
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        processor = BatchSpanProcessor(
            _otlp_exporter(settings), export_timeout_millis=EXPORT_TIMEOUT_S * 1000
        )
        provider.add_span_processor(processor)
        throttle_span_export_logs()  # a collector that is away: a line a minute, not a stream
    return provider


async def shutdown_spans(provider: TracerProvider, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """Flush the spans still queued and stop export, waiting at most ``timeout_s``.

    The SDK's shutdown blocks (up to 30 s, plus a running export) on a collector that does not
    answer, so it runs in a daemon thread of its own, off the event loop and never joined at
    exit (an executor's thread would be). Returns False, after one warning, when it did not
    finish in time: the spans not sent by then are dropped as the process exits.
    """
    done: Future[None] = Future()

    def run() -> None:
        try:
            provider.shutdown()
        except Exception:  # the SDK logs its own; nothing here may keep the loop waiting
            logger.exception("span export shutdown failed")
        finally:
            # Cancelled when the wait below gave up first: nobody is waiting any more.
            with suppress(InvalidStateError):
                done.set_result(None)

    threading.Thread(target=run, name="span-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.wrap_future(done), timeout_s)
    except TimeoutError:
        logger.warning(
            "spans: the OTLP collector took no spans within %.0f s of shutdown; "
            "those not yet sent are dropped",
            timeout_s,
        )
        return False
    return True


def _otlp_exporter(settings: Settings) -> SpanExporter:
    endpoint = settings.otlp_endpoint
    try:
        if settings.otlp_protocol == "http":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            # The HTTP exporter wants the full URL of the traces resource.
            url = endpoint if endpoint and endpoint.endswith("/v1/traces") else None
            if url is None and endpoint:
                url = endpoint.rstrip("/") + "/v1/traces"
            return HttpExporter(endpoint=url, timeout=EXPORT_TIMEOUT_S)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
    except ImportError as exc:  # the exporters are an optional extra
        raise RuntimeError(
            "--otlp-endpoint needs the OTLP exporters: pip install 'embedplex[otlp]'"
        ) from exc


def current_span_context() -> SpanContext | None:
    """The current (request) span's context, if it is a real one."""
    ctx = trace.get_current_span().get_span_context()
    return ctx if ctx.is_valid else None


def stage_span(
    tracer: Tracer, name: str, start: float, end: float, attributes: Mapping[str, AttrValue]
) -> None:
    """Write a finished child span of the current span from perf_counter instants."""
    span = tracer.start_span(name, start_time=to_epoch_ns(start), attributes=attributes)
    span.end(end_time=to_epoch_ns(max(start, end)))


def request_stage_spans(
    tracer: Tracer, model: str, start: float, tokenized: float, items: Sequence[Item[Any, Any]]
) -> None:
    """The per-request breakdown: tokenize, queue (slowest input), inference (whole span)."""
    attrs: dict[str, AttrValue] = {"embedplex.model": model, "embedplex.inputs": len(items)}
    stage_span(tracer, "tokenize", start, tokenized, attrs)
    first = min(i.enqueued_at for i in items)
    started = max(i.started_at for i in items)
    stage_span(tracer, "queue", first, started, attrs)
    stage_span(
        tracer,
        "inference",
        min(i.started_at for i in items),
        max(i.finished_at for i in items),
        {**attrs, "embedplex.batch_size": max(i.batch_size for i in items)},
    )


class BatchSpans(NullObserver):
    """One span per batch, linked to the span of every request that has an input in it."""

    def __init__(self, tracer: Tracer, model: str) -> None:
        self._tracer = tracer
        self._model = model

    def on_batch_done(self, stats: BatchStats) -> None:
        seen: set[int] = set()
        links: list[Link] = []
        for item in stats.items:
            ctx = item.trace
            if isinstance(ctx, SpanContext) and ctx.span_id not in seen:
                seen.add(ctx.span_id)
                links.append(Link(ctx))
        end = time.perf_counter()
        span = self._tracer.start_span(
            "batch inference",
            context=Context(),  # a root: the batch belongs to no single request
            links=links,
            start_time=to_epoch_ns(end - stats.duration),
            attributes={
                "embedplex.model": self._model,
                "embedplex.batch_size": stats.size,
                "embedplex.batch_tokens": stats.tokens,
                "embedplex.padded_tokens": stats.padded_tokens,
                "embedplex.requests": len(links),
            },
        )
        if stats.error is not None:
            span.set_status(Status(StatusCode.ERROR, type(stats.error).__name__))
        span.end(end_time=to_epoch_ns(end))


@contextmanager
def upstream_span(
    tracer: Tracer | None, provider: str, n_inputs: int, traces: Sequence[SpanContext] = ()
) -> Iterator[Span | None]:
    """A client span around one upstream attempt (for remote provider adapters).

    Yields None when tracing is off. ``traces`` are the request spans whose inputs the call
    carries (``Item.trace`` of the batch's items, oldest first). The span is a child of the
    first of them, the request whose input opened the batch, and links to the others; with none
    (the router's own probe) it is a root. The current context is not used: the batch task that
    makes the call inherited it from whichever request happened to create the batch lane.
    """
    if tracer is None:
        yield None
        return
    requests = list({(c.trace_id, c.span_id): c for c in traces if c.is_valid}.values())
    parent = trace.set_span_in_context(NonRecordingSpan(requests[0])) if requests else Context()
    with tracer.start_as_current_span(
        f"upstream {provider}",
        context=parent,
        kind=SpanKind.CLIENT,
        links=[Link(c) for c in requests[1:]],
        attributes={
            "embedplex.provider": provider,
            "embedplex.inputs": n_inputs,
            "embedplex.requests": len(requests),
        },
    ) as span:
        yield span
