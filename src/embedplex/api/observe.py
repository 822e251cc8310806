"""Per-request observability: metrics, the request span and a log line, from one place.

Routes and the pipeline's refusals fill in the request's ``RequestRecord`` (model, inputs,
tokens, timings, error type); ``RequestObserver.finish`` reads it once the answer has gone out
(``api/pipeline.py`` calls it for every route). Probes, ``/metrics`` and the status route are
left out: scrapes and kubelet probes would drown the real traffic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import Request
from starlette.types import Scope

from embedplex.core.types import Timings
from embedplex.observability import Telemetry
from embedplex.observability.log_records import LogSite
from embedplex.observability.metrics import NO_MODEL, UNKNOWN_MODEL

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

QUIET_PATHS = ("/health", "/metrics", "/ping", "/api/v1/status", "/docs", "/openapi.json")
# Refusals logged at most once a second each (``RequestObserver._log_refusal``): overload, and
# requests without a valid key (a client guessing keys, or one misconfigured and retrying).
SAMPLED = (429, 401)
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
    out, for every route alike. Probes, scrapes, docs and the status route are left out (they
    still pass the pipeline's stages): they would drown the real traffic.
    """

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        paths: frozenset[str] = frozenset(),
        log_requests: bool = True,
        usage: UsageMeter | None = None,
    ) -> None:
        """``paths``: the app's route paths, to label requests refused before routing.
        ``usage``: where per-key usage is counted for the state store (``keys usage``)."""
        self.usage = usage
        self.metrics = telemetry.metrics
        self.tracer = telemetry.tracer
        self.paths = paths
        self.log_requests = log_requests
        # Refusals' log lines are sampled (``_log_refusal``): per status, (quiet until, unlogged).
        self._sampled: dict[int, list[float]] = {status: [0.0, 0] for status in SAMPLED}

    def start(self, ex: Exchange) -> None:
        """Open the request's span (when tracing) and make it current for the handler."""
        if self.tracer is None or ex.path.startswith(QUIET_PATHS):
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in ex.scope["headers"]}
        parent = _propagator.extract(carrier)
        span = self.tracer.start_span(
            f"{ex.method} {ex.path}", context=parent, kind=SpanKind.SERVER
        )
        ex.span = (span, otel_context.attach(trace.set_span_in_context(span, parent)))

    def finish(self, ex: Exchange, status: int) -> None:
        """Count one finished request, end its span and log it."""
        if ex.span is not None:
            span, token = ex.span
            ex.span = None
            otel_context.detach(token)
            self._end_span(span, ex, self._route(ex.scope), status)
        if ex.path.startswith(QUIET_PATHS):
            return
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
            self._log(ex.scope, ex.state, route, status, duration, record)

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
        """Whether this refusal (429, 401) gets its own line: at most one a second per status,
        which says how many were left out before it. Under a storm of retried refusals, or of
        guessed keys, a line each would cost more than the refusal itself and flood the log;
        the metrics still count every one."""
        window = self._sampled[status]
        now = time.monotonic()
        if now < window[0]:
            window[1] += 1
            return False
        window[0] = now + 1.0
        if window[1]:
            access_log.info(
                "%d refusals (%d) not logged in the last second", int(window[1]), status
            )
            window[1] = 0
        return True

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
    ) -> None:
        t = record.timings or Timings()
        rid = state.get("request_id", "")
        tenant = state.get("tenant")
        key_id = getattr(tenant, "key_id", None)  # an id only: the key never reaches the log
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
                f" key={key_id}" if key_id else "",
            ),
            {
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


def _logged_path(path: str) -> str:
    """``path`` as the access log writes it: cut to LOGGED_PATH characters, marked as cut."""
    return path if len(path) <= LOGGED_PATH else path[:LOGGED_PATH] + "..."
