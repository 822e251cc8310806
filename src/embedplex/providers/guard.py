"""The one way into a provider's upstream: circuit breaker, concurrency cap, split on refusal
(of the call's size, or of one of its inputs).

Embed calls (``runtime``) and rerank calls (``rerank_lanes``) to one provider go through the
same ``UpstreamGuard``, so they see one health and one concurrency cap (one vendor account, one
rate limit), and the rules for a refused or oversized call are written once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

from embedplex.core.deadline import BATCH_DEADLINE
from embedplex.core.errors import (
    EmbedplexError,
    UnavailableError,
    UpstreamError,
    UpstreamRefusedError,
    UpstreamTooLargeError,
)
from embedplex.providers.health import ProviderHealth
from embedplex.providers.http import MIN_ATTEMPT, SPLIT_BEGAN

P = TypeVar("P")
R = TypeVar("R")

# An upstream's refusal of one input among several (TEI's 422 for a text over its length,
# OpenAI's 400 "maximum context length"): the call is split to find it.
_REFUSED = frozenset({400, 422})
# Texts one bad input costs: a split of n texts isolates it in 2*ceil(log2 n) extra calls, and
# a batch may spend that for this many bad inputs (a call refused for every text, say for
# parameters the upstream rejects, would otherwise cost 2n - 1 calls).
ISOLATED_PER_BATCH = 2


class _Split:
    """What one batch's splits on refusal may still spend: upstream calls, and time (the
    retry budget of the call that was split, as ``HttpTransport`` counts it from
    ``SPLIT_BEGAN``)."""

    __slots__ = ("calls_left",)

    def __init__(self, n: int) -> None:
        self.calls_left = ISOLATED_PER_BATCH * 2 * math.ceil(math.log2(max(2, n)))


class UpstreamGuard:
    """Lets one provider's upstream calls through: breaker first, then the shared semaphore."""

    def __init__(
        self,
        name: str,
        health: ProviderHealth,
        semaphore: asyncio.Semaphore,
        counters: Counter[str],
        *,
        budget: float = math.inf,
    ) -> None:
        self.name = name
        self.health = health
        self.semaphore = semaphore
        self.counters = counters
        self.budget = budget  # the provider's retry_budget_s: a split's sub-calls share it

    async def call(
        self,
        items: list[P],
        send: Callable[[list[P]], Awaitable[list[R]]],
        cost: Callable[[P], int] | None = None,
    ) -> list[R | BaseException]:
        """``send(items)`` (one result per item), split after a refusal of its size or of one
        of its inputs.

        A refusal of the call's size (a 413, or ``UpstreamTooLargeError``: a vendor's 400 or
        422 saying the call holds more texts or tokens than one call may, or an answer to it
        over ``max_response_bytes``) means the upstream
        takes less than we sent, not that any input is bad: the call is cut into parts that
        fit what the refusal said (``max_items`` inputs, ``max_cost`` by ``cost``), in halves
        where it said nothing, outside the bounds below, so valid callers never fail for
        sharing a call; a call of one input refused so is that input's refusal (a 422 to its
        caller, as below). Another 400 or 422 means one input among several is refused (over its
        context length): splitting in halves lets that input fail alone, with
        ``UpstreamRefusedError`` (a 422 to its caller) in its place, and the others answered.
        Every part asks the breaker again, so a circuit that opens meanwhile stops the rest.
        Splits on an input's refusal are bounded (``_Split``): parts left when the calls or the
        retry budget are spent fail with the upstream's error. A call that fails whole without
        a split raises (every caller gets the error).
        """
        return await self._call(items, send, None, cost)

    async def _call(
        self,
        items: list[P],
        send: Callable[[list[P]], Awaitable[list[R]]],
        split: _Split | None,
        cost: Callable[[P], int] | None,
    ) -> list[R | BaseException]:
        if not self.health.acquire():
            raise UnavailableError(
                f"provider {self.name}: circuit is {self.health.state.value}; "
                f"next probe in {self.health.retry_in:.1f}s"
            )
        async with self.semaphore:
            began = time.monotonic()
            try:
                return await send(items)  # type: ignore[return-value]  # R is R | BaseException
            except asyncio.CancelledError:
                self.health.abandon()  # a cancelled probe must not hold the half-open slot
                raise
            except UpstreamError as exc:
                failed = exc
        status = failed.status
        if isinstance(failed, UpstreamTooLargeError) or status == 413:
            if len(items) == 1:
                # One input the upstream takes no call of: too large for it, as a refused
                # input is (a TEI before 2026-02 answered an input over its length with 413).
                raise _refused(failed)
            self.counters["splits"] += 1
            self.counters["size_refusals"] += 1
            parts = _fit(items, failed, cost)
            done = await asyncio.gather(*(self._part(p, send, split, cost) for p in parts))
            return [r for part in done for r in part]
        if status in _REFUSED:
            if len(items) == 1:
                raise _refused(failed)
            if split is None:
                split = _Split(len(items))
                if SPLIT_BEGAN.get() is None:
                    SPLIT_BEGAN.set(began)  # the halves' tasks copy it: one budget for all
            if split.calls_left < 2 or not self._time_left(began, time.monotonic() - began):
                raise failed
            split.calls_left -= 2
        else:
            raise failed
        self.counters["splits"] += 1
        half = len(items) // 2
        left, right = await asyncio.gather(
            self._part(items[:half], send, split, cost),
            self._part(items[half:], send, split, cost),
        )
        return left + right

    async def _part(
        self,
        items: list[P],
        send: Callable[[list[P]], Awaitable[list[R]]],
        split: _Split | None,
        cost: Callable[[P], int] | None,
    ) -> list[R | BaseException]:
        """One part of a split: its results, or its error in each of its items' places (one
        part failing leaves the others' answers standing)."""
        try:
            return await self._call(items, send, split, cost)
        except EmbedplexError as exc:
            return [exc] * len(items)

    def _time_left(self, began: float, took: float) -> bool:
        """Whether a split's sub-calls may still be sent: as long as the refused call
        (``took``) is left of the retry budget of the call that was split and of the callers'
        deadline. A part sent without the time it needs would only time out, a failure on the
        breaker's count."""
        root = SPLIT_BEGAN.get()
        end = (began if root is None else root) + self.budget
        callers = BATCH_DEADLINE.get()
        if callers is not None:
            end = min(end, callers)
        return time.monotonic() + max(MIN_ATTEMPT, took) < end


def _fit(items: list[P], refusal: UpstreamError, cost: Callable[[P], int] | None) -> list[list[P]]:
    """``items`` in order, cut into parts that each fit what a refusal of their size said
    (``UpstreamTooLargeError``: inputs, and estimated tokens by ``cost``); in halves where it
    said nothing that cuts them (a 413, a limit these items already keep)."""
    said = refusal if isinstance(refusal, UpstreamTooLargeError) else None
    most = (said.max_items if said else None) or len(items)
    budget = (said.max_cost if said else None) or 0
    weigh = cost if budget else None
    parts: list[list[P]] = []
    part: list[P] = []
    held = 0
    for item in items:
        weight = weigh(item) if weigh is not None else 0
        if part and (len(part) >= most or (weigh is not None and held + weight > budget)):
            parts.append(part)
            part, held = [], 0
        part.append(item)
        held += weight
    parts.append(part)
    if len(parts) == 1:
        half = len(items) // 2
        return [items[:half], items[half:]]
    return parts


def _refused(error: UpstreamError) -> UpstreamRefusedError:
    """The upstream's refusal of one input, as its caller's 422 (the upstream's own words,
    already sanitized by ``HttpTransport``)."""
    out = UpstreamRefusedError(error.message, param="input")
    out.__cause__ = error
    return out


def token_shares(tokens: int | None, texts: list[str]) -> list[float]:
    """Each text's share of one call's billed ``tokens``, by length (for usage reporting).

    Upstreams bill tokens per call, not per input, and a call carries several callers' inputs.
    """
    total = sum(len(t) for t in texts) or 1
    billed = float(tokens or 0)
    return [billed * len(t) / total for t in texts]
