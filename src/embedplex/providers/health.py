"""Rolling-window health of one provider, and its circuit breaker.

Every upstream attempt is recorded. Connect errors, timeouts, 5xx and malformed answers are
failures; 2xx is a success; 429, 413 and other 4xx say nothing about the upstream's health
(rate limits are handled by retries and AIMD, bad requests are the caller's fault).

    CLOSED --(breaker_failures failures in a row)--> OPEN --(cooldown)--> HALF_OPEN
    HALF_OPEN --(probe succeeds)--> CLOSED;  HALF_OPEN --(probe fails)--> OPEN

In HALF_OPEN one call at a time is let through as the probe; the router also sends a small
probe of its own when no traffic comes (``embedplex.providers.router``).

A 429 is remembered apart from the circuit: the provider is rate limited for its Retry-After
(``RATE_LIMIT_PAUSE`` without one), at most the breaker's cool-down. The router's ``any``
policy passes over a rate-limited provider, as over an open circuit, while a later provider
can take the request (``limited_for``); nothing else changes (retries, probes, the breaker).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from embedplex.providers.http import Attempt, Outcome

_FAILURES = frozenset(
    {Outcome.TIMEOUT, Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR, Outcome.MALFORMED}
)
_NEUTRAL = frozenset({Outcome.RATE_LIMITED, Outcome.TOO_LARGE, Outcome.CLIENT_ERROR})
# How long a 429 without Retry-After keeps a provider rate limited (seconds): long enough to
# send the callers that can go elsewhere elsewhere, short enough to find the limit lifted soon.
RATE_LIMIT_PAUSE = 1.0


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class ProviderHealth:
    """Health stats over ``window`` seconds plus the breaker state machine."""

    def __init__(
        self,
        *,
        failures_to_open: int = 5,
        cooldown: float = 10.0,
        window: float = 60.0,
        probe_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown = cooldown
        self.window = window
        self.probe_timeout = probe_timeout
        self._clock = clock
        # Told of every transition (metrics); the cool-down's end is noticed when the state is
        # next read (by a caller, the router's prober or a status page), not on a timer.
        self.on_change: Callable[[CircuitState], None] | None = None
        self._state = CircuitState.CLOSED
        self._opened_at = 0.0
        self._probe_since: float | None = None
        self.consecutive_failures = 0
        self.times_opened = 0
        self._limited_until = 0.0  # a 429's Retry-After ends then (clock time)
        self._events: deque[tuple[float, bool, float]] = deque()  # (when, ok, latency)

    @property
    def state(self) -> CircuitState:
        """The current state; an open circuit turns half-open once its cool-down is over."""
        if self._state is CircuitState.OPEN and self._clock() >= self._opened_at + self.cooldown:
            self._state = CircuitState.HALF_OPEN
            self._probe_since = None
            self._changed()
        return self._state

    @property
    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 unless open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())

    def available(self) -> bool:
        """Worth routing to: closed, or half-open with no probe in flight."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN:
            return self._probe_since is None or self._clock() - self._probe_since > (
                self.probe_timeout
            )
        return False

    def limited_for(self) -> float:
        """Seconds this provider is still rate limited (0: it is not)."""
        left = self._limited_until - self._clock()
        return left if left > 0 else 0.0

    def acquire(self) -> bool:
        """Take permission for one call; in half-open this makes the call the probe."""
        if not self.available():
            return False
        if self._state is CircuitState.HALF_OPEN:
            self._probe_since = self._clock()
        return True

    def abandon(self) -> None:
        """A call let through was cancelled before it ended (every caller left): in half-open,
        the next call may be the probe, rather than waiting out ``probe_timeout``."""
        if self._state is CircuitState.HALF_OPEN:
            self._probe_since = None

    def record(self, attempt: Attempt) -> None:
        now = self._clock()
        if attempt.outcome in _NEUTRAL:
            if attempt.outcome is Outcome.RATE_LIMITED:
                wait = RATE_LIMIT_PAUSE if attempt.retry_after is None else attempt.retry_after
                until = now + min(wait, self.cooldown)
                self._limited_until = max(self._limited_until, until)
            if self._state is CircuitState.HALF_OPEN:
                self._close()  # it answered: alive, if picky
            return
        ok = attempt.outcome not in _FAILURES
        self._events.append((now, ok, attempt.latency))
        self._prune(now)
        if ok:
            self.consecutive_failures = 0
            if self._state is not CircuitState.CLOSED:
                self._close()
            return
        self.consecutive_failures += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED
            and self.consecutive_failures >= self.failures_to_open
        ):
            self._open(now)

    def _open(self, now: float) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = now
        self._probe_since = None
        self.times_opened += 1
        self._changed()

    def _close(self) -> None:
        self._state = CircuitState.CLOSED
        self._probe_since = None
        self.consecutive_failures = 0
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self._state)

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()

    def snapshot(self) -> dict[str, Any]:
        self._prune(self._clock())
        n = len(self._events)
        oks = sum(1 for _, ok, _ in self._events if ok)
        latencies = sorted(lat for _, ok, lat in self._events if ok)
        return {
            "circuit": self.state.value,
            "retry_in_s": round(self.retry_in, 3),
            "rate_limited_for_s": round(self.limited_for(), 3),
            "times_opened": self.times_opened,
            "consecutive_failures": self.consecutive_failures,
            "window_s": self.window,
            "attempts_in_window": n,
            "success_rate": round(oks / n, 4) if n else None,
            "latency_p50_ms": _ms(latencies, 0.5),
            "latency_p99_ms": _ms(latencies, 0.99),
        }


def _ms(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000, 3)
