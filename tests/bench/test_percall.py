"""``bench/percall.py``: the app driven with raw ASGI calls serves every request it counts."""

from __future__ import annotations

import gc

import pytest

from embedplex.bench.percall import GcClock, drive


@pytest.mark.parametrize("dialect", ["openai", "tei"])
async def test_drive_serves_every_request_and_times_the_collector(dialect: str) -> None:
    threshold = gc.get_threshold()
    gc.set_threshold(1, *threshold[1:])  # a collection at once, so the clock must see some
    clock = GcClock()
    try:
        cpu = await drive(24, 4, 14, 16, dialect, clock=clock)
    finally:
        gc.set_threshold(*threshold)
    assert cpu > 0
    assert sum(clock.collections) > 0 and clock.seconds > 0
    assert clock not in gc.callbacks  # detached when the run ends
    assert gc.isenabled()
