"""FailureThrottle: wrong secrets per client address, GCRA, bounded memory."""

from __future__ import annotations

import pytest

from embedplex.limits import FailureThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_failures_throttles_the_address_until_one_has_drained() -> None:
    clock = Clock()
    throttle = FailureThrottle(burst=3, window_s=30.0, clock=clock)
    assert throttle.wait("a") == 0.0
    assert [throttle.failed("a") for _ in range(3)] == [False, False, True]
    assert throttle.wait("a") == pytest.approx(10.0)  # one failure drains every 30 / 3 s
    assert throttle.wait("b") == 0.0  # another address is not affected
    clock.now += 9.0
    assert throttle.wait("a") == pytest.approx(1.0)
    clock.now += 1.0
    assert throttle.wait("a") == 0.0  # lifted: one more try
    assert throttle.failed("a")  # and wrong again: throttled again at once
    assert throttle.wait("a") == pytest.approx(10.0)
    clock.now += 30.0
    assert throttle.wait("a") == 0.0
    assert not throttle.failed("a")  # a full window later the whole burst is back


def test_the_table_of_addresses_is_bounded_least_recently_failed_first() -> None:
    clock = Clock()
    throttle = FailureThrottle(burst=2, window_s=10.0, max_clients=20, clock=clock)
    spray = [f"10.0.0.{i}" for i in range(19)]
    throttle.failed("guesser")
    for address in spray:
        throttle.failed(address)
    throttle.failed("guesser")  # throttled now, and the most recent failure
    assert throttle.wait("guesser") > 0
    throttle.failed("new")  # full: the least recently failed tenth goes, at once
    assert len(throttle._tat) == 19
    assert throttle.wait("guesser") > 0  # the spray did not flush the guesser out
    assert "10.0.0.0" not in throttle._tat and "10.0.0.1" not in throttle._tat
    assert "10.0.0.2" in throttle._tat


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        FailureThrottle(burst=0)
    with pytest.raises(ValueError, match="window_s"):
        FailureThrottle(window_s=0)
