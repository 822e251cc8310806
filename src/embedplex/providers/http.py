"""HTTP plumbing shared by every remote adapter: pooled client, retries, error mapping.

One ``httpx.AsyncClient`` (owned by the router) pools connections for all providers. A call is
retried on connect errors, timeouts, 5xx and 429 with full-jitter exponential backoff, each
attempt capped at ``attempt_timeout`` and all of them at ``budget`` seconds; ``Retry-After``
is honoured. A 429 is not waited out when every caller of the call has another provider to go
to (``CALL_FAILOVER``): the call fails at once and the router's ``any`` policy moves on.
Failures leave this module only as embedplex errors (``raise ... from exc``): the last 429 as
``RateLimitedError(retry_after=...)``, a timeout as ``UpstreamTimeoutError``, any other upstream
failure as ``UpstreamError(status=...)``; their text never holds our credentials (the call's
key headers, the endpoint's query values: ``sanitize``). Every attempt is reported to a
listener, which feeds health, the circuit breaker, adaptive batch sizing and metrics; each
retry to a retry listener; with a tracer, each attempt runs inside an ``upstream <provider>``
client span.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import httpx
import orjson
from opentelemetry.trace import Span, Status, StatusCode

from embedplex.core.deadline import BATCH_DEADLINE, SHUTDOWN
from embedplex.core.errors import (
    EmbedplexError,
    RateLimitedError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamTooLargeError,
)
from embedplex.observability.tracing import upstream_span
from embedplex.providers.config import MAX_RESPONSE_BYTES
from embedplex.providers.wire import OversizedAnswer, WireClient

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, Tracer

# The least time worth an attempt: a retry that would have less before the deadline is not sent.
MIN_ATTEMPT = 0.05
# When the call that a split part belongs to began (``guard.py``): the part's retry budget is
# what that call has left, not a budget of its own. None: not a split part.
SPLIT_BEGAN: ContextVar[float | None] = ContextVar("embedplex_split_began", default=None)

# Statuses worth another attempt besides 429 and 5xx: request timeout, Cloudflare-style 52x.
_RETRY_STATUSES = frozenset({408, 429})

# Whether the caller in this task has another provider to try after this one: set by the
# router's ``any`` policy around each provider but the last one it could still use, read where
# the caller's inputs are queued (they carry it into the batch).
FAILOVER: ContextVar[bool] = ContextVar("embedplex_failover", default=False)
# Whether every caller of the upstream call running in this task has one (set by the batch
# function from its inputs): a 429 then ends the call at once, and its callers fail over,
# rather than all of them waiting out Retry-After here. One caller with nowhere else to go
# keeps the wait for the whole call (its callers share one answer).
CALL_FAILOVER: ContextVar[bool] = ContextVar("embedplex_call_failover", default=False)


class Outcome(StrEnum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"  # 429
    TOO_LARGE = "too_large"  # 413: the batch was too big for the upstream
    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"  # 5xx
    CONNECT_ERROR = "connect_error"  # refused, reset, protocol error
    CLIENT_ERROR = "client_error"  # other 4xx: the request's fault, not the upstream's health
    MALFORMED = "malformed"  # 2xx with a body we cannot read


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream HTTP attempt, as health tracking and AIMD see it."""

    started: float  # time.monotonic()
    latency: float
    outcome: Outcome
    status: int | None
    size: int  # texts in the call
    retry_after: float | None = None  # a 429's Retry-After, in seconds

    @property
    def status_text(self) -> str:
        """The HTTP status as text ("200", "429"), else the failure ("timeout", "malformed")."""
        if self.status is None or self.outcome is Outcome.MALFORMED:
            return self.outcome.value
        if self.outcome is Outcome.TOO_LARGE and self.status < 300:  # an answer over the cap
            return self.outcome.value
        return str(self.status)


AttemptListener = Callable[[Attempt], None]
# Called with the failed attempt's ``status_text`` just before the retry is sent.
RetryListener = Callable[[str], None]
T = TypeVar("T")
Parse = Callable[[Any, httpx.Headers], T]

# What a parser raises when a 2xx body does not have the documented shape.
MALFORMED_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    attempt_timeout: float = 15.0
    budget: float = 45.0
    max_attempts: int = 8
    backoff_base: float = 0.1
    backoff_max: float = 10.0

    def backoff(self, retry: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**retry)]."""
        return random.uniform(0.0, min(self.backoff_max, self.backoff_base * (2.0**retry)))


# The longest wait an upstream's Retry-After may set: past it the value is read as this.
MAX_RETRY_AFTER = 86400.0


def _seconds(value: float) -> float | None:
    """A wait in [0, MAX_RETRY_AFTER]; None for NaN and infinities ("inf", "1e400" parse as
    floats), which are no wait at all: they would reach ``math.ceil`` and fail the answer."""
    if not math.isfinite(value):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, value))


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (delta seconds or an HTTP date),
    capped at a day; None when absent or not a finite number."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            wait = _seconds(float(raw_ms) / 1000)
        except ValueError:
            wait = None
        if wait is not None:
            return wait
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return _seconds(float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return _seconds(when.timestamp() - time.time())


MAX_REASON = 200  # characters of an upstream's own words passed on to the caller
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# A credential an upstream may echo back (some echo the request's headers in their errors).
_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic|token|api[-_ ]?key)([\s:=\"']+)[^\s\"',}]+")


def sanitize(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` safe to hand a caller and to log: no secret, no control character, short.

    Upstream error bodies are the upstream's words, not ours: a caller sees at most
    ``MAX_REASON`` characters of them, on one line, with our own key (``secrets``) and anything
    that looks like a credential replaced by ``***``. A body cut at its cap (``wire.py``) may
    end in the first part of a secret: that part goes too.
    """
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
            for n in range(min(len(secret), len(text)) - 1, 3, -1):
                if text.endswith(secret[:n]):
                    text = text[:-n] + "***"
                    break
    text = _CREDENTIAL.sub(r"\1\2***", text)
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def header_secrets(headers: dict[str, str]) -> list[str]:
    """The credentials among a call's headers (whole values and their token part)."""
    out = []
    for name, value in headers.items():
        if name.lower() in ("content-type", "accept", "user-agent"):
            continue
        out += [value, value.partition(" ")[2]]
    return [s for s in out if s]


def query_secrets(url: str) -> list[str]:
    """The values in ``url``'s query, as written and decoded: a key may travel there
    (``?key=...``: Gemini, Azure-style), and no name list tells a key from a harmless value."""
    query = url.partition("?")[2].partition("#")[0]
    out = []
    for part in query.split("&"):
        value = part.partition("=")[2]
        if value:
            out += [value, urllib.parse.unquote_plus(value)]
    return out


def call_secrets(url: str, headers: dict[str, str], more: Sequence[str] = ()) -> list[str]:
    """What no text of a call's failure may show: its key headers, its query's values and
    ``more`` (a proxy's credentials), longest first (a secret inside another is taken out
    after it)."""
    found = {*header_secrets(headers), *query_secrets(url), *more}
    return sorted(found, key=len, reverse=True)


# The most of an error body read for its reason (the wire reads no more than this anyway).
_BODY_CUT = 16 * 1024


def _upstream_message(response: httpx.Response, secrets: Sequence[str] = ()) -> str:
    """A short, printable reason from the usual error bodies (OpenAI, TEI, Voyage, Cohere).

    Secrets go before the reason is cut (``sanitize``): a cut first could split one and
    leave its head behind.
    """
    reason = ""
    try:
        body = response.json()
    except ValueError:
        reason = response.text[:_BODY_CUT]
    else:
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):
                err = err.get("message")
            for value in (err, body.get("message"), body.get("detail")):
                if isinstance(value, str) and value:
                    reason = value[:_BODY_CUT]
                    break
        if not reason:
            reason = str(body)[:_BODY_CUT]
    return sanitize(reason, secrets) or response.reason_phrase


def _annotate(span: Span, attempt: Attempt, retry: int, *, failed: bool) -> None:
    span.set_attributes({"embedplex.outcome": attempt.status_text, "embedplex.retry": retry})
    if attempt.status is not None:
        span.set_attribute("http.response.status_code", attempt.status)
    if failed:
        span.set_status(Status(StatusCode.ERROR, attempt.status_text))


@dataclass(slots=True)
class _Done(Generic[T]):
    """How one attempt ended: the parsed result, or the error and whether to retry."""

    outcome: Outcome
    status: int | None
    error: EmbedplexError | None = None
    retryable: bool = False
    retry_after: float | None = None
    result: T | None = None


class HttpTransport:
    """POST JSON to one provider with retries; report each attempt to ``listener``.

    ``gate`` runs before every retry and may raise to stop retrying (an open circuit); a retry
    that passes it is reported to ``on_retry``. With a ``tracer`` every attempt gets a span.
    """

    def __init__(
        self,
        provider: str,
        client: httpx.AsyncClient,
        *,
        policy: RetryPolicy,
        listener: AttemptListener | None = None,
        gate: Callable[[], None] | None = None,
        on_retry: RetryListener | None = None,
        tracer: Tracer | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        secrets: Sequence[str] = (),
    ) -> None:
        self.provider = provider
        self.client = client
        # What no failure's text may show besides each call's own (a proxy's credentials).
        self.secrets = tuple(secrets)
        # The largest 2xx body read (the router's wire enforces it: ``wire.py``); past it the
        # answer is malformed.
        self.max_response_bytes = max_response_bytes
        # The router's own client has a cheaper way to POST (``WireClient.post_bytes``).
        self._post = client.post_bytes if isinstance(client, WireClient) else None
        self.policy = policy
        self.listener = listener
        self.gate = gate
        self.on_retry = on_retry
        self.tracer = tracer

    async def post_json(
        self,
        url: str,
        body: dict[str, Any],
        *,
        parse: Parse[T],
        headers: dict[str, str],
        size: int,
        traces: Sequence[SpanContext] = (),
    ) -> T:
        """``parse`` of the first successful attempt's JSON body and headers.

        A body that is not JSON or that ``parse`` rejects is a malformed answer: it counts
        against the provider's health and is not retried. ``traces``: the request spans whose
        texts the call carries, for the attempt spans (see ``upstream_span``).
        """
        policy = self.policy
        began = time.monotonic()
        split = SPLIT_BEGAN.get()
        deadline = (began if split is None else split) + policy.budget
        # The callers' own deadline, when nearer: no attempt runs on after they have left.
        callers = BATCH_DEADLINE.get()
        limited_by = "retry budget"
        if callers is not None and callers < deadline:
            deadline, limited_by = callers, "request deadline"
        stop = SHUTDOWN.at  # draining: retries end with the grace period
        if stop is not None and stop < deadline:
            deadline, limited_by = stop, "shutdown grace period"
        content = orjson.dumps(body)
        headers = {**headers, "content-type": "application/json"}
        retry = 0
        why = ""  # the previous attempt's status text: the reason this one is a retry
        while True:
            if retry:
                if self.gate is not None:
                    self.gate()
                if self.on_retry is not None:
                    self.on_retry(why)
            started = time.monotonic()
            timeout = max(0.001, min(policy.attempt_timeout, deadline - started))
            with upstream_span(self.tracer, self.provider, size, traces) as span:
                done = await self._attempt(url, content, headers, timeout, parse, size)
                attempt = Attempt(
                    started,
                    time.monotonic() - started,
                    done.outcome,
                    done.status,
                    size,
                    done.retry_after,
                )
                if span is not None:
                    _annotate(span, attempt, retry, failed=done.error is not None)
            if self.listener is not None:
                self.listener(attempt)
            error = done.error
            if error is None:
                return cast(T, done.result)
            why = attempt.status_text
            retry += 1
            delay = policy.backoff(retry)
            if done.retry_after is not None:
                delay = max(delay, done.retry_after)
            # The caller of a 429 always learns when to come back, even if upstream did not say.
            hint = done.retry_after if done.retry_after is not None else delay
            if (
                not done.retryable
                or retry >= policy.max_attempts
                or (done.outcome is Outcome.RATE_LIMITED and CALL_FAILOVER.get())
            ):
                raise self._final(error, retry, hint, began=began)
            # No new attempt that could not finish in time (at least MIN_ATTEMPT of it).
            if time.monotonic() + delay + MIN_ATTEMPT >= deadline:
                raise self._final(error, retry, hint, budget=limited_by, began=began)
            await asyncio.sleep(delay)

    async def _attempt(
        self,
        url: str,
        content: bytes,
        headers: dict[str, str],
        limit: float,
        parse: Parse[T],
        size: int,
    ) -> _Done[T]:
        """One HTTP attempt of at most ``limit`` seconds in all, classified (``size``: the
        inputs the call carries).

        All: a timeout per read restarts with each chunk, so an upstream that trickles bytes
        would outlast ``timeout_s`` and the budget. ``post_bytes`` bounds the total itself
        (aiohttp's ``total``); any other client's call runs under ``asyncio.timeout``.
        """
        try:
            if self._post is not None:
                response = await self._post(url, content, headers, limit, self.max_response_bytes)
            else:
                async with asyncio.timeout(limit):
                    response = await self.client.post(
                        url, content=content, headers=headers, timeout=limit
                    )
        except (httpx.TimeoutException, TimeoutError) as exc:
            error: EmbedplexError = UpstreamTimeoutError(
                f"{self.provider}: no answer within {limit:.3g}s", status=None
            )
            error.__cause__ = exc
            return _Done(Outcome.TIMEOUT, None, error, retryable=True)
        except httpx.TransportError as exc:
            reason = sanitize(str(exc), call_secrets(url, headers, self.secrets))
            error = UpstreamError(f"{self.provider}: {type(exc).__name__}: {reason}")
            error.__cause__ = exc
            return _Done(Outcome.CONNECT_ERROR, None, error, retryable=True)
        except OversizedAnswer as exc:
            if size > 1:
                return self._oversized(exc, size)
            return self._malformed(exc.status, exc, url, headers)
        except httpx.DecodingError as exc:  # gzip or deflate that does not unpack
            status = getattr(exc, "status", None)
            return self._malformed(status, exc, url, headers)
        status = response.status_code
        outcome, failed, retryable, retry_after = self._classify(response, url, headers)
        if failed is not None:
            return _Done(outcome, status, failed, retryable=retryable, retry_after=retry_after)
        try:
            return _Done(
                outcome, status, result=parse(orjson.loads(response.content), response.headers)
            )
        except (orjson.JSONDecodeError, *MALFORMED_ERRORS) as exc:
            return self._malformed(status, exc, url, headers)

    def _malformed(
        self, status: int | None, exc: Exception, url: str, headers: dict[str, str]
    ) -> _Done[Any]:
        """A 2xx answer that cannot be read: a failure of the upstream's, not retried."""
        reason = sanitize(f"{type(exc).__name__}: {exc}", call_secrets(url, headers, self.secrets))
        error = UpstreamError(
            f"{self.provider}: upstream answered {status} with a malformed body ({reason})",
            status=status,
        )
        error.__cause__ = exc
        return _Done(Outcome.MALFORMED, status, error)

    def _oversized(self, exc: OversizedAnswer, size: int) -> _Done[Any]:
        """An answer over ``max_response_bytes`` to a call of ``size`` inputs: the call asked
        for more than one answer may hold (TEI at 2,048 texts of 4,096 floats as JSON: about
        109 MB), not a fault of the upstream's. It is the call's size that is refused: split
        in halves (``guard.py``), half as many per call learned (``HttpProvider.sized``);
        neither a failure for the breaker nor retried. One input's answer over it stays a
        malformed answer."""
        error = UpstreamTooLargeError(
            f"{self.provider}: the answer to {size} inputs was over {self.max_response_bytes} "
            "bytes (max_response_bytes)",
            status=exc.status,
            max_items=-(-size // 2),
        )
        error.__cause__ = exc
        return _Done(Outcome.TOO_LARGE, exc.status, error)

    def _classify(
        self, response: httpx.Response, url: str, headers: dict[str, str]
    ) -> tuple[Outcome, EmbedplexError | None, bool, float | None]:
        status = response.status_code
        if 200 <= status < 300:
            return Outcome.OK, None, False, None
        reason = _upstream_message(response, call_secrets(url, headers, self.secrets))
        message = f"{self.provider}: upstream answered {status}: {reason}"
        if status == 429:
            retry_after = parse_retry_after(response.headers)
            return Outcome.RATE_LIMITED, UpstreamError(message, status=429), True, retry_after
        if status >= 500 or status in _RETRY_STATUSES:
            return Outcome.SERVER_ERROR, UpstreamError(message, status=status), True, None
        if status == 413:
            return Outcome.TOO_LARGE, UpstreamError(message, status=413), False, None
        return Outcome.CLIENT_ERROR, UpstreamError(message, status=status), False, None

    def _final(
        self,
        error: EmbedplexError,
        attempts: int,
        retry_after: float | None,
        *,
        budget: str | None = None,
        began: float,
    ) -> EmbedplexError:
        """The last attempt's error, told as the caller lived it: a timeout names the time
        spent over every attempt (not the last attempt's share of it)."""
        took = time.monotonic() - began
        if isinstance(error, UpstreamTimeoutError):
            error.message = f"{self.provider}: no answer within {took:.3g}s"
        if attempts > 1 or budget:
            why = f"{budget} spent" if budget else "attempts exhausted"
            error.message = f"{error.message} ({attempts} attempts in {took:.3g}s, {why})"
        error.args = (error.message,)
        if isinstance(error, UpstreamError) and error.status == 429:
            limited = RateLimitedError(error.message, retry_after=retry_after)
            limited.__cause__ = error
            return limited
        return error
