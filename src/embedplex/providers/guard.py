"""The one way into a provider's upstream: circuit breaker, concurrency cap, split on 413.

Embed calls (``runtime``) and rerank calls (``rerank_lanes``) to one provider go through the
same ``UpstreamGuard``, so they see one health and one concurrency cap (one vendor account, one
rate limit), and the rules for a refused or oversized call are written once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

from embedplex.core.errors import UnavailableError, UpstreamError
from embedplex.providers.health import ProviderHealth

P = TypeVar("P")
R = TypeVar("R")


class UpstreamGuard:
    """Lets one provider's upstream calls through: breaker first, then the shared semaphore."""

    def __init__(
        self,
        name: str,
        health: ProviderHealth,
        semaphore: asyncio.Semaphore,
        counters: Counter[str],
    ) -> None:
        self.name = name
        self.health = health
        self.semaphore = semaphore
        self.counters = counters

    async def call(self, items: list[P], send: Callable[[list[P]], Awaitable[list[R]]]) -> list[R]:
        """``send(items)`` (one result per item), each half again on its own after a 413.

        A 413 means the upstream takes fewer inputs than we sent: splitting lets one oversized
        input fail alone instead of taking its batch with it. Every half asks the breaker
        again, so a circuit that opens meanwhile stops the rest.
        """
        if not self.health.acquire():
            raise UnavailableError(
                f"provider {self.name}: circuit is {self.health.state.value}; "
                f"next probe in {self.health.retry_in:.1f}s"
            )
        out: list[R] | None = None
        async with self.semaphore:
            try:
                out = await send(items)
            except asyncio.CancelledError:
                self.health.abandon()  # a cancelled probe must not hold the half-open slot
                raise
            except UpstreamError as exc:
                if exc.status != 413 or len(items) < 2:
                    raise
        if out is None:
            self.counters["splits"] += 1
            half = len(items) // 2
            left, right = await asyncio.gather(
                self.call(items[:half], send), self.call(items[half:], send)
            )
            return left + right
        return out


def token_shares(tokens: int | None, texts: list[str]) -> list[float]:
    """Each text's share of one call's billed ``tokens``, by length (for usage reporting).

    Upstreams bill tokens per call, not per input, and a call carries several callers' inputs.
    """
    total = sum(len(t) for t in texts) or 1
    billed = float(tokens or 0)
    return [billed * len(t) / total for t in texts]
