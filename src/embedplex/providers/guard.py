"""The one way into a provider's upstream: circuit breaker, concurrency cap, split on refusal.

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
        self, items: list[P], send: Callable[[list[P]], Awaitable[list[R]]]
    ) -> list[R | BaseException]:
        """``send(items)`` (one result per item), split in halves after a 413, 400 or 422.

        A 413 means the upstream takes fewer inputs than we sent; a 400 or 422 that one input
        among several is refused (over its context length): splitting lets that input fail
        alone, with ``UpstreamRefusedError`` (a 422 to its caller) in its place, and the others
        answered. Every half asks the breaker again, so a circuit that opens meanwhile stops
        the rest. Splits on a refusal are bounded (``_Split``): parts left when the calls or
        the retry budget are spent fail with the upstream's error. A call that fails whole
        without a split raises (every caller gets the error).
        """
        return await self._call(items, send, None)

    async def _call(
        self,
        items: list[P],
        send: Callable[[list[P]], Awaitable[list[R]]],
        split: _Split | None,
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
        if status == 413 and len(items) > 1:
            pass
        elif status in _REFUSED:
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
            self._part(items[:half], send, split), self._part(items[half:], send, split)
        )
        return left + right

    async def _part(
        self,
        items: list[P],
        send: Callable[[list[P]], Awaitable[list[R]]],
        split: _Split | None,
    ) -> list[R | BaseException]:
        """One half of a split: its results, or its error in each of its items' places (one
        half failing leaves the other's answers standing)."""
        try:
            return await self._call(items, send, split)
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
