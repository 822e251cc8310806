"""Per-request observability: one middleware records metrics, the request span and a log line.

Routes and error handlers fill in the request's ``RequestRecord`` (model, inputs, tokens,
timings, error type); the middleware reads it when the response is done. Probes, ``/metrics``
and the status route are left out: scrapes and kubelet probes would drown the real traffic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedplex.core.types import Timings
from embedplex.observability import Telemetry
from embedplex.observability.metrics import NO_MODEL

access_log = logging.getLogger("embedplex.access")

QUIET_PATHS = ("/health", "/metrics", "/ping", "/api/v1/status", "/docs", "/openapi.json")
# Responses written by middleware (no exception handler ran) still get an error type.
_STATUS_KINDS = {
    401: "authentication",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "overloaded",
    499: "client_gone",
    503: "unhealthy",
}
_propagator = TraceContextTextMapPropagator()


@dataclass(slots=True)
class RequestRecord:
    """What one API request did, filled in as it goes."""

    model: str = NO_MODEL
    inputs: int = 0
    tokens: int = 0
    error_type: str | None = None
    timings: Timings | None = None


def request_record(request: Request) -> RequestRecord:
    """This request's record (a detached one when the middleware is not installed)."""
    return scope_record(request.scope)


def scope_record(scope: Scope) -> RequestRecord:
    """``request_record`` for code that holds the ASGI scope (pure ASGI routes)."""
    record = scope.get("state", {}).get("record")
    return record if isinstance(record, RequestRecord) else RequestRecord()


def _route_of(scope: Scope, paths: frozenset[str]) -> str:
    """The route template (bounded label values), even for requests refused before routing."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    return scope["path"] if scope["path"] in paths else "unmatched"


class ObservabilityMiddleware:
    """Metrics, the server span (honouring ``traceparent``) and one log line per request."""

    def __init__(
        self,
        app: ASGIApp,
        telemetry: Telemetry,
        *,
        paths: frozenset[str] = frozenset(),
        log_requests: bool = True,
    ) -> None:
        """``paths``: the app's route paths, to label requests refused before routing."""
        self.app = app
        self.paths = paths
        self.observer = RequestObserver(telemetry, log_requests=log_requests)
        self.tracer = telemetry.tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(QUIET_PATHS):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        record = state["record"] = RequestRecord()
        status = 500
        span = token = None
        if self.tracer is not None:
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            parent = _propagator.extract(carrier)
            span = self.tracer.start_span(
                f"{scope['method']} {scope['path']}", context=parent, kind=SpanKind.SERVER
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status = 500
            record.error_type = record.error_type or "internal"
            raise
        finally:
            route = _route_of(scope, self.paths)
            self.observer.finish(scope, route, status, start, record)
            if span is not None and token is not None:
                self._end_span(span, scope, route, status, record)
                otel_context.detach(token)

    @staticmethod
    def _end_span(
        span: trace.Span, scope: Scope, route: str, status: int, record: RequestRecord
    ) -> None:
        span.update_name(f"{scope['method']} {route}")
        span.set_attributes(
            {
                "http.request.method": scope["method"],
                "http.route": route,
                "http.response.status_code": status,
                "embedplex.model": record.model,
                "embedplex.inputs": record.inputs,
                "embedplex.tokens": record.tokens,
                "embedplex.request_id": scope.get("state", {}).get("request_id", ""),
            }
        )
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, record.error_type))
        span.end()


class RequestObserver:
    """Counts finished API requests and logs one line each (middleware and hot path alike)."""

    def __init__(self, telemetry: Telemetry, *, log_requests: bool = True) -> None:
        self.metrics = telemetry.metrics
        self.log_requests = log_requests

    def finish(
        self, scope: Scope, route: str, status: int, start: float, record: RequestRecord
    ) -> None:
        """Count one finished request and log it (also called by the hot path)."""
        duration = time.perf_counter() - start
        if status >= 400 and record.error_type is None:
            record.error_type = _STATUS_KINDS.get(status, f"http_{status}")
        self.metrics.observe_request(
            route,
            record.model,
            status,
            duration,
            error_type=record.error_type,
            timings=record.timings if status < 400 else None,
        )
        if self.log_requests and access_log.isEnabledFor(logging.INFO):
            self._log(scope, scope["state"], route, status, duration, record)

    @staticmethod
    def _log(
        scope: Scope,
        state: dict[str, Any],
        route: str,
        status: int,
        duration: float,
        record: RequestRecord,
    ) -> None:
        t = record.timings or Timings()
        rid = state.get("request_id", "")
        key_id = state.get("key_id")  # an id only: the key itself never reaches the log
        access_log.info(
            "%s %s %d %.1fms model=%s inputs=%d tokens=%d queue=%.1fms inference=%.1fms id=%s%s",
            scope["method"],
            scope["path"],
            status,
            duration * 1000,
            record.model,
            record.inputs,
            record.tokens,
            t.queue,
            t.inference,
            rid,
            f" key={key_id}" if key_id else "",
            extra={
                "request_id": rid,
                "method": scope["method"],
                "route": route,
                "status": status,
                "model": record.model,
                "inputs": record.inputs,
                "tokens": record.tokens,
                "duration_ms": round(duration * 1000, 3),
                "tokenization_ms": round(t.tokenization, 3),
                "queue_ms": round(t.queue, 3),
                "inference_ms": round(t.inference, 3),
                "error_type": record.error_type,
                "key_id": key_id,
            },
        )
