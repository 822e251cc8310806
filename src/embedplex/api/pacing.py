"""Pacing overload refusals, so that clients retrying at once cannot starve accepted work.

A refusal (429) is cheap, but a client that retries the moment it hears one sends the next at
once: 192 such clients keep the event loop refusing flat out. That loop runs at a higher
priority than the inference threads (``serve/process_tuning.py``), so every refusal it answers
is CPU taken from the requests it accepted (measured: accepted throughput fell to a third with
256 retrying clients against a cap of 64, docs/reliability.md). Making each refusal cheaper
does not end that: the loop only refuses faster. So past a rate of refusals answered at once
(``FAST_PER_S``, a token bucket), each further overload refusal is held ``hold`` seconds before
it is sent: the retrying client waits there, costing a timer rather than a loop's worth of CPU.
A client with a few requests over the cap still hears its 429 at once.
"""

from __future__ import annotations

import asyncio
import time

FAST_PER_S = 200.0  # refusals a second answered without a hold (also the burst)
PACED_KINDS = frozenset({"overloaded", "rate_limited"})  # the 429s; 503s are not paced


class RefusalPacer:
    """``hold``: seconds a refusal past the fast rate waits before it is sent (0: off)."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self._tokens = FAST_PER_S
        self._at = time.monotonic()
        self.held = 0  # refusals held so far (tests, status)

    def delay(self) -> float:
        """Seconds to hold the refusal being answered now (0: send it at once)."""
        if self.hold <= 0:
            return 0.0
        now = time.monotonic()
        self._tokens = min(FAST_PER_S, self._tokens + (now - self._at) * FAST_PER_S)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        self.held += 1
        return self.hold

    async def pace(self) -> None:
        wait = self.delay()
        if wait:
            await asyncio.sleep(wait)
