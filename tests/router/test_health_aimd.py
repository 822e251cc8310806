"""Circuit breaker and AIMD as pure state machines (a fake clock, synthetic attempts)."""

from __future__ import annotations

from embedplex.providers.aimd import AimdController
from embedplex.providers.health import CircuitState, ProviderHealth
from embedplex.providers.http import Attempt, Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attempt(outcome: Outcome, *, started: float = 0.0, latency: float = 0.1) -> Attempt:
    return Attempt(started=started, latency=latency, outcome=outcome, status=None, size=1)


def test_breaker_opens_after_consecutive_failures_probes_then_closes() -> None:
    clock = Clock()
    health = ProviderHealth(failures_to_open=3, cooldown=10, clock=clock)
    for _ in range(2):
        health.record(attempt(Outcome.SERVER_ERROR))
    assert health.state is CircuitState.CLOSED
    health.record(attempt(Outcome.OK))  # a success resets the streak
    for _ in range(3):
        health.record(attempt(Outcome.TIMEOUT))
    assert health.state is CircuitState.OPEN
    assert not health.acquire()
    clock.now += 10
    assert health.state is CircuitState.HALF_OPEN
    assert health.acquire()  # the probe
    assert not health.acquire()  # only one probe at a time
    health.record(attempt(Outcome.OK))
    assert health.state is CircuitState.CLOSED
    assert health.acquire()
    assert health.acquire()
    assert health.times_opened == 1


def test_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    health = ProviderHealth(failures_to_open=1, cooldown=5, clock=clock)
    health.record(attempt(Outcome.CONNECT_ERROR))
    clock.now += 5
    assert health.acquire()
    health.record(attempt(Outcome.SERVER_ERROR))
    assert health.state is CircuitState.OPEN
    assert health.retry_in == 5
    assert health.times_opened == 2


def test_rate_limits_and_client_errors_do_not_open_the_circuit() -> None:
    health = ProviderHealth(failures_to_open=2, clock=Clock())
    for outcome in (Outcome.RATE_LIMITED, Outcome.CLIENT_ERROR, Outcome.TOO_LARGE) * 3:
        health.record(attempt(outcome))
    assert health.state is CircuitState.CLOSED


def test_snapshot_reports_the_rolling_window() -> None:
    clock = Clock()
    health = ProviderHealth(window=60, clock=clock)
    health.record(attempt(Outcome.OK, latency=0.2))
    health.record(attempt(Outcome.SERVER_ERROR))
    snap = health.snapshot()
    assert snap["attempts_in_window"] == 2
    assert snap["success_rate"] == 0.5
    assert snap["latency_p50_ms"] == 200
    clock.now += 61
    assert health.snapshot()["attempts_in_window"] == 0


def test_aimd_halves_on_congestion_and_grows_on_fast_success() -> None:
    aimd = AimdController(ceiling=64, floor=2, increase=4, latency_target=1.0)
    assert aimd.size == 64
    assert aimd.observe(attempt(Outcome.RATE_LIMITED, started=1.0)) == 32
    assert aimd.observe(attempt(Outcome.TOO_LARGE, started=2.0)) == 16
    assert aimd.observe(attempt(Outcome.TIMEOUT, started=3.0)) == 8
    assert aimd.observe(attempt(Outcome.OK, latency=0.5)) == 12
    assert aimd.observe(attempt(Outcome.OK, latency=1.5)) == 12  # too slow: hold
    assert aimd.observe(attempt(Outcome.SERVER_ERROR)) == 12  # not congestion: hold
    for _ in range(20):
        aimd.observe(attempt(Outcome.OK, latency=0.1))
    assert aimd.size == 64  # capped at the ceiling


def test_aimd_halves_once_per_congestion_episode_and_respects_the_floor() -> None:
    aimd = AimdController(ceiling=64, floor=5)
    # Four concurrent calls that all started before the first failure came back.
    for _ in range(4):
        aimd.observe(attempt(Outcome.RATE_LIMITED, started=10.0, latency=0.5))
    assert aimd.size == 32
    for i in range(10):
        aimd.observe(attempt(Outcome.RATE_LIMITED, started=20.0 + i, latency=0.1))
    assert aimd.size == 5
