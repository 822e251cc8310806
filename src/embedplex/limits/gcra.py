"""The window: GCRA (a token bucket kept as one timestamp per limit), and the in-process store.

Why GCRA rather than a sliding window: a limit of ``n`` per minute becomes a bucket of ``n`` that
refills continuously (one unit every ``60 / n`` seconds), held as one number per limit, the
*theoretical arrival time* (TAT): the moment the bucket will be full again. Checking and
charging are O(1) with no per-request entries (a sliding log of a 200,000-token-per-minute key
would hold 200,000 of them), a cost of any size is one addition, and the OpenAI headers fall
out of it: ``remaining = (window - (tat - now)) / interval``, ``reset = tat - now``.

When a request is charged (``docs/limits.md``): a request is *admitted* if one request fits in
its requests bucket and at least one token is left in its tokens bucket (the request unit is
taken then; the body is not read yet). Just before it queues its inputs it *reserves* their
tokens (``reserve``: a count, a bound, or for remote texts an estimate): refused if less than
one token is left (not counting what the same request reserved before), else taken at once, so
of requests in flight together only the one whose reservation emptied the bucket is let in past
what was left, as with OpenAI (which counts a request's estimate when it arrives); an estimate
that was under (non-English text sent upstream: up to about 4 times) lets each request in
flight overspend by that until its finish charges the rest. When it finishes, ``finish``
charges its real tokens less what it reserved (a refund when that is negative, never past a
full bucket). One request may still overspend what was left; the next ones wait until the
bucket is back above zero.

``admit``, ``reserve`` and ``finish`` below are the one definition of the rules; the Redis store
runs the same rules as Lua scripts (``redis_store.py``), and the tests hold them to the same
outcomes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from embedplex.core.tenant import KeyLimits

WINDOW_S = 60.0  # "per minute": the bucket's size is one minute of its rate


@dataclass(frozen=True, slots=True)
class Budget:
    """One limit as the headers tell it: the limit, what is left, seconds until full again."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a limiter decided for one request.

    ``refused``: the limit that refused it (``rpm``, ``tpm``, ``concurrency``), None when
    admitted; ``retry_after``: seconds until that limit would admit it.
    """

    refused: str | None = None
    retry_after: float = 0.0
    requests: Budget | None = None
    tokens: Budget | None = None


def _budget(limit: int, tat: float, now: float) -> Budget:
    interval = WINDOW_S / limit
    ahead = max(tat - now, 0.0)
    return Budget(limit, max(math.floor((WINDOW_S - ahead) / interval + 1e-6), 0), ahead)


@dataclass(slots=True)
class _KeyState:
    requests_tat: float = 0.0
    tokens_tat: float = 0.0
    in_flight: int = 0


class LocalLimits:
    """Per-key limits held in this process (the default, and the fallback when Redis is away).

    Keys idle for longer than a window (buckets full, nothing in flight) are forgotten, so the
    table holds only recently active keys however many keys exist.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._swept = self._clock()

    def admit(self, key: str, limits: KeyLimits) -> Verdict:
        """Take one request and one concurrency slot, or refuse without taking anything."""
        now = self._clock()
        self._sweep(now)
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        requests = tokens = None
        new_tat = state.requests_tat
        if limits.rpm is not None:
            new_tat = max(state.requests_tat, now) + WINDOW_S / limits.rpm
            requests = _budget(limits.rpm, new_tat, now)
            if new_tat - now > WINDOW_S + 1e-9:
                requests = _budget(limits.rpm, state.requests_tat, now)
                tokens = _tokens(limits, state, now)
                return Verdict("rpm", new_tat - WINDOW_S - now, requests, tokens)
        tokens = _tokens(limits, state, now)
        if tokens is not None and tokens.remaining <= 0:
            wait = state.tokens_tat - now - WINDOW_S + WINDOW_S / tokens.limit
            return Verdict("tpm", max(wait, 0.0), requests, tokens)
        if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
            return Verdict("concurrency", 1.0, requests, tokens)
        state.requests_tat = new_tat
        state.in_flight += 1
        return Verdict(None, 0.0, requests, tokens)

    def reserve(self, key: str, limits: KeyLimits, tokens: int, held: int = 0) -> Verdict:
        """Take ``tokens`` from the tokens bucket, or refuse (taking nothing) if less than one
        token is left there besides ``held``, what the same request reserved before (a request
        queuing in parts never refuses itself)."""
        tpm = limits.tpm
        if tpm is None or tokens <= 0:
            return Verdict()
        now = self._clock()
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        interval = WINDOW_S / tpm
        requests = None if limits.rpm is None else _budget(limits.rpm, state.requests_tat, now)
        others = state.tokens_tat - held * interval  # the bucket as others left it
        if _budget(tpm, others, now).remaining <= 0:
            wait = max(others - now - WINDOW_S + interval, 0.0)
            return Verdict("tpm", wait, requests, _budget(tpm, state.tokens_tat, now))
        state.tokens_tat = _charged(state.tokens_tat, now, tokens * interval)
        return Verdict(None, 0.0, requests, _budget(tpm, state.tokens_tat, now))

    def finish(self, key: str, limits: KeyLimits, tokens: int) -> None:
        """Give back the concurrency slot and charge ``tokens`` (negative: a refund)."""
        state = self._keys.get(key)
        if state is None:
            return
        now = self._clock()
        state.in_flight = max(state.in_flight - 1, 0)
        if limits.tpm is not None and tokens:
            state.tokens_tat = _charged(state.tokens_tat, now, tokens * WINDOW_S / limits.tpm)

    def charge(self, key: str, limits: KeyLimits, tokens: int) -> None:
        """Charge (or refund) tokens without a slot to give back (a request admitted
        elsewhere, or a reservation settled here for a request finished elsewhere)."""
        now = self._clock()
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        if limits.tpm is not None and tokens:
            state.tokens_tat = _charged(state.tokens_tat, now, tokens * WINDOW_S / limits.tpm)

    def in_flight(self, key: str) -> int:
        state = self._keys.get(key)
        return 0 if state is None else state.in_flight

    def _sweep(self, now: float) -> None:
        if now - self._swept < WINDOW_S:
            return
        self._swept = now
        idle = [
            k
            for k, s in self._keys.items()
            if s.in_flight == 0 and max(s.requests_tat, s.tokens_tat) <= now
        ]
        for k in idle:
            del self._keys[k]


def _charged(tat: float, now: float, seconds: float) -> float:
    """``tat`` after a charge of ``seconds`` of refill; a refund (negative) never fills the
    bucket past full (a TAT before ``now``)."""
    if seconds >= 0:
        return max(tat, now) + seconds
    return max(tat + seconds, now)


def _tokens(limits: KeyLimits, state: _KeyState, now: float) -> Budget | None:
    return None if limits.tpm is None else _budget(limits.tpm, state.tokens_tat, now)
