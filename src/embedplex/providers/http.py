"""HTTP plumbing shared by every remote adapter: pooled client, retries, error mapping.

One ``httpx.AsyncClient`` (owned by the router) pools connections for all providers. A call is
retried on connect errors, timeouts, 5xx and 429 with full-jitter exponential backoff, each
attempt capped at ``attempt_timeout`` and all of them at ``budget`` seconds; ``Retry-After``
is honoured. Failures leave this module only as embedplex errors (``raise ... from exc``): the
last 429 as ``RateLimitedError(retry_after=...)``, a timeout as ``UpstreamTimeoutError``, any
other upstream failure as ``UpstreamError(status=...)``. Every attempt is reported to a
listener, which feeds health, the circuit breaker and adaptive batch sizing.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar, cast

import httpx
import orjson

from embedplex.errors import (
    EmbedplexError,
    RateLimitedError,
    UpstreamError,
    UpstreamTimeoutError,
)

# Statuses worth another attempt besides 429 and 5xx: request timeout, Cloudflare-style 52x.
_RETRY_STATUSES = frozenset({408, 429})


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


AttemptListener = Callable[[Attempt], None]
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


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (delta seconds or an HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _upstream_message(response: httpx.Response) -> str:
    """A short, printable reason from the usual error bodies (OpenAI, TEI, Voyage, Cohere)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            err = err.get("message")
        for value in (err, body.get("message"), body.get("detail")):
            if isinstance(value, str) and value:
                return value[:200]
    return str(body)[:200]


class HttpTransport:
    """POST JSON to one provider with retries; report each attempt to ``listener``.

    ``gate`` runs before every retry and may raise to stop retrying (an open circuit).
    """

    def __init__(
        self,
        provider: str,
        client: httpx.AsyncClient,
        *,
        policy: RetryPolicy,
        listener: AttemptListener | None = None,
        gate: Callable[[], None] | None = None,
    ) -> None:
        self.provider = provider
        self.client = client
        self.policy = policy
        self.listener = listener
        self.gate = gate

    async def post_json(
        self,
        url: str,
        body: dict[str, Any],
        *,
        parse: Parse[T],
        headers: dict[str, str],
        size: int,
    ) -> T:
        """``parse`` of the first successful attempt's JSON body and headers.

        A body that is not JSON or that ``parse`` rejects is a malformed answer: it counts
        against the provider's health and is not retried.
        """
        policy = self.policy
        deadline = time.monotonic() + policy.budget
        content = orjson.dumps(body)
        headers = {**headers, "content-type": "application/json"}
        retry = 0
        while True:
            if retry and self.gate is not None:
                self.gate()
            started = time.monotonic()
            timeout = max(0.001, min(policy.attempt_timeout, deadline - started))
            error: EmbedplexError | None = None
            retryable, retry_after = False, None
            status: int | None = None
            result: T | None = None
            try:
                response = await self.client.post(
                    url, content=content, headers=headers, timeout=timeout
                )
            except httpx.TimeoutException as exc:
                outcome, retryable = Outcome.TIMEOUT, True
                error = UpstreamTimeoutError(
                    f"{self.provider}: no answer within {timeout:.3g}s", status=None
                )
                error.__cause__ = exc
            except httpx.TransportError as exc:
                outcome, retryable = Outcome.CONNECT_ERROR, True
                error = UpstreamError(f"{self.provider}: {type(exc).__name__}: {exc}"[:300])
                error.__cause__ = exc
            else:
                status = response.status_code
                outcome, error, retryable, retry_after = self._classify(response)
                if error is None:
                    try:
                        result = parse(orjson.loads(response.content), response.headers)
                    except (orjson.JSONDecodeError, *MALFORMED_ERRORS) as exc:
                        outcome = Outcome.MALFORMED
                        error = UpstreamError(
                            f"{self.provider}: upstream answered {status} with a malformed body "
                            f"({type(exc).__name__}: {exc})"[:300],
                            status=status,
                        )
                        error.__cause__ = exc
            self.report(started, outcome, status, size)
            if error is None:
                return cast(T, result)
            retry += 1
            delay = policy.backoff(retry)
            if retry_after is not None:
                delay = max(delay, retry_after)
            # The caller of a 429 always learns when to come back, even if upstream did not say.
            hint = retry_after if retry_after is not None else delay
            if not retryable or retry >= policy.max_attempts:
                raise self._final(error, retry, hint)
            if time.monotonic() + delay >= deadline:
                raise self._final(error, retry, hint, budget=True)
            await asyncio.sleep(delay)

    def report(self, started: float, outcome: Outcome, status: int | None, size: int) -> None:
        if self.listener is not None:
            latency = time.monotonic() - started
            self.listener(Attempt(started, latency, outcome, status, size))

    def _classify(
        self, response: httpx.Response
    ) -> tuple[Outcome, EmbedplexError | None, bool, float | None]:
        status = response.status_code
        if 200 <= status < 300:
            return Outcome.OK, None, False, None
        reason = _upstream_message(response)
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
        budget: bool = False,
    ) -> EmbedplexError:
        if attempts > 1 or budget:
            why = "retry budget spent" if budget else "attempts exhausted"
            error.message = f"{error.message} ({attempts} attempts, {why})"
            error.args = (error.message,)
        if isinstance(error, UpstreamError) and error.status == 429:
            limited = RateLimitedError(error.message, retry_after=retry_after)
            limited.__cause__ = error
            return limited
        return error
