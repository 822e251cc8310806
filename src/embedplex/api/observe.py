"""Per-request observability: metrics, the request span and a log line, from one place.

Routes and the pipeline's refusals fill in the request's ``RequestRecord`` (model, inputs,
tokens, timings, error type); ``RequestObserver.finish`` reads it once the answer has gone out
(``api/pipeline.py`` calls it for every route). The successful answers of probes, ``/metrics``,
the docs and the status route are left out: scrapes and kubelet probes would drown the real
traffic. Their failures (a wrong key for ``/metrics``, a wrong admin secret) are not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import Request
from starlette.types import Scope

from embedplex.api.docs import DOC_PATHS
from embedplex.core.types import Timings
from embedplex.observability import Telemetry
from embedplex.observability.log_records import LogSite
from embedplex.observability.metrics import NO_MODEL, UNKNOWN_MODEL
from embedplex.observability.tracing import to_epoch_ns

if TYPE_CHECKING:
    from embedplex.api.pipeline import Exchange
    from embedplex.state.usage import UsageMeter

access_log = logging.getLogger("embedplex.access")
# One line per request: made without logging's caller and thread-name lookups (``LogSite``).
_access_line = LogSite(
    access_log,
    logging.INFO,
    "%s %s %d %.1fms model=%s inputs=%d tokens=%d queue=%.1fms inference=%.1fms id=%s%s",
)

# The probes answer 503 to say "not ready" (loading, draining) or "dead": their answer, asked
# every few seconds through every start and rollout, not a failed request (``embedplex_ready``
# and the probe itself report it).
PROBE_PATHS = frozenset({"/health", "/health/live", "/health/ready"})
# Paths whose successful answers (below 400, and the probes' 503) are neither counted, traced
# nor logged. Exact paths: ``/healthz`` or ``/metricsfoo`` is a 404 like any other, and a
# refusal here (a wrong key for ``/metrics``, a wrong admin secret for the status) is counted
# and logged as anywhere.
QUIET_PATHS = PROBE_PATHS | {
    *("/metrics", "/api/v1/status"),
    *DOC_PATHS,  # the pages, /openapi.json and the pages' scripts
}
# Refusals logged at most once a second each (``RequestObserver._log_refusal``): overload, and
# requests without a valid key (a client guessing keys, or one misconfigured and retrying).
SAMPLED = (429, 401)
REFUSAL_WINDOW_S = 1.0
# A path is logged up to this many characters (a URL may be ~16 KB, the head's limit).
LOGGED_PATH = 256
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
    """This request's record (a detached one outside the pipeline)."""
    return scope_record(request.scope)


def scope_record(scope: Scope) -> RequestRecord:
    """``request_record`` for code that holds the ASGI scope (pure ASGI routes)."""
    record = scope.get("state", {}).get("record")
    return record if isinstance(record, RequestRecord) else RequestRecord()


class RequestObserver:
    """Metrics, the server span (honouring ``traceparent``) and one log line per request.

    The pipeline calls ``start`` as a request comes in and ``finish`` once its answer has gone
    out, for every route alike. The successful answers of probes, scrapes, docs and the status
    route (``QUIET_PATHS``) are left out (they still pass the pipeline's stages): they would
    drown the real traffic.
    """

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        paths: frozenset[str] = frozenset(),
        log_requests: bool = True,
        log_trace_ids: bool = True,
        usage: UsageMeter | None = None,
    ) -> None:
        """``paths``: the app's route paths, to label requests refused before routing.
        ``log_trace_ids``: a traced request's line carries its trace and span ids (off:
        ``--disable-spans``, as TEI's flag leaves spans out of its log lines).
        ``usage``: where per-key usage is counted for the state store (``keys usage``)."""
        self.usage = usage
        self.metrics = telemetry.metrics
        self.tracer = telemetry.tracer
        self.paths = paths
        self.log_requests = log_requests
        self.log_trace_ids = log_trace_ids
        # Refusals' log lines are sampled (``_log_refusal``), per status.
        self._sampled = {status: _Sampled() for status in SAMPLED}

    def start(self, ex: Exchange) -> None:
        """Open the request's span (when tracing) and make it current for the handler.

        A quiet path gets none now: most of its answers are left out, and one that fails gets
        its span written in ``finish``, from the request's start."""
        if self.tracer is None or ex.path in QUIET_PATHS:
            return
        span, parent = _open_span(self.tracer, ex, None)
        ex.span = (span, otel_context.attach(trace.set_span_in_context(span, parent)))

    def finish(self, ex: Exchange, status: int) -> None:
        """Count one finished request, end its span and log it."""
        quiet = ex.path in QUIET_PATHS
        if quiet and (status < 400 or (status == 503 and ex.path in PROBE_PATHS)):
            return
        span: trace.Span | None = None
        if ex.span is not None:
            span, token = ex.span
            ex.span = None
            otel_context.detach(token)
            self._end_span(span, ex, self._route(ex.scope), status)
        elif quiet and self.tracer is not None:  # a failed answer of a quiet path: traced too
            span, _ = _open_span(self.tracer, ex, to_epoch_ns(ex.start))
            self._end_span(span, ex, self._route(ex.scope), status)
        duration = time.perf_counter() - ex.start
        record = ex.record
        if status >= 400 and record.error_type is None:
            # An answer no error explained (a route's own status): name it by its status.
            record.error_type = f"http_{status}"
        route = self._route(ex.scope)
        self.metrics.observe_request(
            route,
            self._model_label(ex.scope, record),
            status,
            duration,
            error_type=record.error_type,
            timings=record.timings if status < 400 else None,
        )
        key_id = ex.state["tenant"].key_id
        if key_id is not None:
            self._count_key(key_id, status, record)
        if self.log_requests and access_log.isEnabledFor(logging.INFO):
            if status in SAMPLED and not self._log_refusal(status):
                return
            traced = span.get_span_context() if span is not None and self.log_trace_ids else None
            self._log(ex.scope, ex.state, route, status, duration, record, traced)

    def _count_key(self, key_id: str, status: int, record: RequestRecord) -> None:
        """Per-key usage: in metrics now, in the store at the next flush (batched)."""
        ok = status < 400
        inputs = record.inputs if ok else 0
        tokens = record.tokens if ok else 0
        refused = status in (403, 429)
        self.metrics.keys.observe(key_id, inputs, tokens, refused)
        if self.usage is not None:
            self.usage.add(key_id, inputs, tokens, refused)

    def _log_refusal(self, status: int) -> bool:
        """Whether this refusal (429, 401) gets its own line: at most one a second per status.
        Under a storm of retried refusals, or of guessed keys, a line each would cost more than
        the refusal itself and flood the log; the metrics still count every one.

        A line opens a window of ``REFUSAL_WINDOW_S``; the refusals it leaves out are told in
        one line when it closes (a timer, set by the first of them), whether or not another
        refusal ever comes."""
        window = self._sampled[status]
        now = time.monotonic()
        if now < window.until:
            window.unlogged += 1
            if window.unlogged == 1:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (a synchronous caller): told by the next line
                    pass
                else:
                    loop.call_later(window.until - now, self._flush_refusals, status)
            return False
        self._flush_refusals(status)  # a window whose timer has not run yet
        window.opened, window.until = now, now + REFUSAL_WINDOW_S
        return True

    def close(self) -> None:
        """Tell the refusals still left out of the log: at shutdown their windows' timers
        never run."""
        for status in self._sampled:
            self._flush_refusals(status)

    def _flush_refusals(self, status: int) -> None:
        """Log how many refusals of ``status`` the last window left out, if any."""
        window = self._sampled[status]
        if not window.unlogged:
            return
        access_log.info(
            "%d refusals (%d) not logged in the %.1f s after the last one logged",
            window.unlogged,
            status,
            time.monotonic() - window.opened,
        )
        window.unlogged = 0

    def _route(self, scope: Scope) -> str:
        """The route template (bounded label values), even for requests refused before routing."""
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        return scope["path"] if scope["path"] in self.paths else "unmatched"

    @staticmethod
    def _model_label(scope: Scope, record: RequestRecord) -> str:
        """``record.model`` if a served model has that name, else ``unknown`` (a name the
        request made up: an ad-hoc route's, or one not served) or ``-`` (none chosen)."""
        if record.error_type == "model_not_found":
            return UNKNOWN_MODEL
        model = record.model
        if model == NO_MODEL:
            return model
        app = scope.get("app")
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        serves = getattr(gateway, "serves", None)
        return model if serves is not None and serves(model) else UNKNOWN_MODEL

    @staticmethod
    def _end_span(span: trace.Span, ex: Exchange, route: str, status: int) -> None:
        record = ex.record
        span.update_name(f"{ex.method} {route}")
        span.set_attributes(
            {
                "http.request.method": ex.method,
                "http.route": route,
                "http.response.status_code": status,
                "embedplex.model": record.model,
                "embedplex.inputs": record.inputs,
                "embedplex.tokens": record.tokens,
                "embedplex.request_id": ex.state.get("request_id", ""),
                "embedplex.key_id": ex.tenant.key_id or "",
            }
        )
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, record.error_type))
        span.end()

    @staticmethod
    def _log(
        scope: Scope,
        state: dict[str, Any],
        route: str,
        status: int,
        duration: float,
        record: RequestRecord,
        traced: SpanContext | None = None,
    ) -> None:
        t = record.timings or Timings()
        rid = state.get("request_id", "")
        tenant = state.get("tenant")
        key_id = getattr(tenant, "key_id", None)  # an id only: the key never reaches the log
        fields: dict[str, object] = {
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
        }
        trace_text = ""
        if traced is not None and traced.is_valid:
            # The ids a trace backend searches by, as W3C traceparent writes them: a log line
            # leads to its request's spans.
            fields["trace_id"] = format(traced.trace_id, "032x")
            fields["span_id"] = format(traced.span_id, "016x")
            trace_text = f" trace={fields['trace_id']}"
        _access_line.log(
            (
                scope["method"],
                _logged_path(scope["path"]),
                status,
                duration * 1000,
                record.model,
                record.inputs,
                record.tokens,
                t.queue,
                t.inference,
                rid,
                (f" key={key_id}" if key_id else "") + trace_text,
            ),
            fields,
        )


def _open_span(
    tracer: Tracer, ex: Exchange, start_time: int | None
) -> tuple[trace.Span, otel_context.Context]:
    """The request's server span, a child of its ``traceparent`` (if any), and that parent."""
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in ex.scope["headers"]}
    parent = _propagator.extract(carrier)
    span = tracer.start_span(
        f"{ex.method} {ex.path}", context=parent, kind=SpanKind.SERVER, start_time=start_time
    )
    return span, parent


@dataclass(slots=True)
class _Sampled:
    """One sampled status's window: when its last line was logged (``time.monotonic()``),
    until when the next refusals go unlogged, and how many did."""

    opened: float = 0.0
    until: float = 0.0
    unlogged: int = 0


def _logged_path(path: str) -> str:
    """``path`` as the access log writes it: cut to LOGGED_PATH characters, marked as cut."""
    return path if len(path) <= LOGGED_PATH else path[:LOGGED_PATH] + "..."
