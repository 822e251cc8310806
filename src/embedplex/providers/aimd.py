"""Adaptive batch size per provider: additive increase, multiplicative decrease.

The size starts at the ceiling (the configured ``max_batch_size`` capped by the provider's
limit): a healthy upstream should get full batches from the first call. A call that comes back
fast (within ``latency_target``) adds ``increase``; a 413, a 429 or a timeout halves the size.
As in TCP, one congestion episode halves once: an attempt that started before the last
decrease cannot decrease again, so a burst of concurrent failures does not collapse the size
to the floor.
"""

from __future__ import annotations

from embedplex.providers.http import Attempt, Outcome

_CONGESTION = frozenset({Outcome.TOO_LARGE, Outcome.RATE_LIMITED, Outcome.TIMEOUT})


class AimdController:
    def __init__(
        self,
        *,
        ceiling: int,
        floor: int = 1,
        increase: int = 4,
        decrease: float = 0.5,
        latency_target: float = 2.0,
        initial: int | None = None,
    ) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError("AIMD needs 1 <= floor <= ceiling")
        self.ceiling = ceiling
        self.floor = floor
        self.increase = increase
        self.decrease = decrease
        self.latency_target = latency_target
        self.size = max(floor, min(ceiling, initial if initial is not None else ceiling))
        self.increases = 0
        self.decreases = 0
        self._last_decrease = float("-inf")

    def set_ceiling(self, ceiling: int, floor: int) -> None:
        """A new ceiling, learned from the upstream at run time (TEI's ``/info``, a refusal
        that names its limit): a size above it comes down at once; a size at the old ceiling
        moves up with it, as a healthy upstream starts at its ceiling."""
        at_top = self.size >= self.ceiling
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(floor, self.ceiling))
        self.size = self.ceiling if at_top else max(self.floor, min(self.size, self.ceiling))

    def observe(self, attempt: Attempt) -> int:
        """Update on one upstream attempt; return the (possibly new) batch size."""
        if attempt.outcome in _CONGESTION:
            if attempt.started >= self._last_decrease:
                self._last_decrease = attempt.started + attempt.latency
                new = max(self.floor, int(self.size * self.decrease))
                if new < self.size:
                    self.size = new
                    self.decreases += 1
        elif (
            attempt.outcome is Outcome.OK
            and attempt.latency <= self.latency_target
            and self.size < self.ceiling
        ):
            self.size = min(self.ceiling, self.size + self.increase)
            self.increases += 1
        return self.size

    def snapshot(self) -> dict[str, int | float]:
        return {
            "batch_size": self.size,
            "floor": self.floor,
            "ceiling": self.ceiling,
            "increases": self.increases,
            "decreases": self.decreases,
            "latency_target_ms": self.latency_target * 1000,
        }
