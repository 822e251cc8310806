"""One loop timer for the routed requests' deadlines (providers/deadlines.py)."""

from __future__ import annotations

import asyncio

import pytest

from embedplex.providers.deadlines import DeadlineExpired, DeadlineTimer, deadline_timer


async def test_work_done_in_time_returns_and_answered_entries_are_dropped() -> None:
    timer = DeadlineTimer(asyncio.get_running_loop())

    async def answer(k: int) -> int:
        await asyncio.sleep(0)
        return k

    at = asyncio.get_running_loop().time() + 30
    results = [await timer.run(at, answer(k)) for k in range(100)]
    assert results == list(range(100))
    assert len(timer._heap) == 1  # the last one's entry: the others were dropped as it came
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_passed_deadline_cancels_only_its_own_work() -> None:
    loop = asyncio.get_running_loop()
    timer = deadline_timer()
    assert deadline_timer() is timer  # one per loop
    cancelled: list[str] = []

    async def slow(name: str, seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        return name

    async def request(name: str, budget: float, seconds: float) -> str:
        try:
            return await timer.run(loop.time() + budget, slow(name, seconds))
        except DeadlineExpired:
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0  # the cancel was taken back
            return f"{name}: expired"

    start = loop.time()
    out = await asyncio.wait_for(
        asyncio.gather(
            request("late", 0.05, 10), request("in time", 5, 0.1), request("later", 0.15, 10)
        ),
        10,
    )
    assert out == ["late: expired", "in time", "later: expired"]
    assert cancelled == ["late", "later"]
    assert loop.time() - start < 5  # the long sleeps were cut short


async def test_a_cancel_from_elsewhere_is_not_taken_for_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    timer = DeadlineTimer(loop)
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(timer.run(loop.time() + 30, forever()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
