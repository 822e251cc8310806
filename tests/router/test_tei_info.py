"""TEI's ``GET /info`` read beside the calls, never in their way: an /info that hangs or
trickles holds no call, each read is bounded in all, reads that fail back off, and the
endpoint's query (a key) travels to /info too, never into the log.

The upstream is the real HTTP fake with its /info made to misbehave.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from conftest import RouterFactory
from embedplex.core.types import EmbedRequest
from embedplex.providers import tei
from upstream_fakes import FakeUpstream, provider, serving, vector_for


class InfoUpstream(FakeUpstream):
    """The fake, its /info answering as ``mode`` says: "ok", "down" (503), "hang" (no answer
    for a minute) or "trickle" (headers at once, then a byte every 0.1 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.reads: list[tuple[float, str]] = []  # when, and the query it was read with

    async def _info(self, request: Request) -> Response:
        self.reads.append((time.monotonic(), request.url.query))
        if self.mode == "down":
            self.info_status = 503
        elif self.mode == "hang":
            while self.mode == "hang":  # noqa: ASYNC110 (``stop`` ends it, from another thread)
                await asyncio.sleep(0.05)
        elif self.mode == "trickle":
            return StreamingResponse(_trickle(), headers={"content-length": "1000"})
        return await super()._info(request)

    def stop(self) -> None:
        self.mode = "ok"  # a hanging /info lets its server go
        super().stop()


async def _trickle() -> Any:
    for _ in range(1000):
        yield b" "
        await asyncio.sleep(0.1)


@pytest.fixture
def info_upstream() -> Iterator[InfoUpstream]:
    with serving(InfoUpstream()) as fake:
        yield fake


@pytest.fixture
def quick_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """/info's bounds scaled down: each read 0.5 s in all; retries from 0.05 s to 0.4 s."""
    monkeypatch.setattr(tei, "INFO_TIMEOUT_S", 0.5)
    monkeypatch.setattr(tei, "INFO_RETRY_S", 0.05)
    monkeypatch.setattr(tei, "INFO_RETRY_MAX_S", 0.4)


def req(text: str) -> EmbedRequest:
    return EmbedRequest(inputs=[text])


@pytest.mark.usefixtures("quick_info")
@pytest.mark.parametrize("mode", ["hang", "trickle"])
async def test_an_info_that_hangs_or_trickles_holds_no_call(
    mode: str, info_upstream: InfoUpstream, make_router: RouterFactory
) -> None:
    """Behind a gateway that black-holes /info, or one that trickles it: the read at start
    ends at INFO_TIMEOUT_S in all (a trickle restarted the per-read timeout with every byte,
    and held start for as long as it lasted), and the reads after it, due while calls come,
    run beside them: no call waits for one (each had waited out the read before its POST)."""
    info_upstream.mode = mode
    began = time.monotonic()
    router = await asyncio.wait_for(make_router(provider("t", info_upstream, "tei")), 5)
    assert time.monotonic() - began < 2
    took = []
    for i in range(30):  # 1.5 s of calls: reads fall due again and again meanwhile
        began = time.monotonic()
        result = await router.embed(req(f"x{i}"), ["t"])
        took.append(time.monotonic() - began)
        assert (result.vectors[0] == vector_for(f"x{i}")).all()
        await asyncio.sleep(0.05)
    assert len(info_upstream.reads) >= 3  # read again while the calls went on
    assert max(took) < 0.3, took


@pytest.mark.usefixtures("quick_info")
async def test_reads_of_an_info_that_fails_back_off(
    info_upstream: InfoUpstream, make_router: RouterFactory
) -> None:
    """An /info that keeps failing is read 0.05 s after the first failure (INFO_RETRY_S),
    then twice as long after each one, up to 0.4 s (INFO_RETRY_MAX_S): a handful of reads
    over 1.6 s of steady calls, not one every 0.05 s."""
    info_upstream.mode = "down"
    router = await make_router(provider("t", info_upstream, "tei"))
    end = time.monotonic() + 1.6
    while time.monotonic() < end:
        await router.embed(req("x"), ["t"])
        await asyncio.sleep(0.01)
    times = [t for t, _ in info_upstream.reads]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]  # from the first call's read
    assert 4 <= len(times) <= 9, gaps
    assert all(later >= earlier * 0.8 for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] >= 0.35


async def test_info_is_read_with_the_endpoints_query_which_the_log_never_shows(
    info_upstream: InfoUpstream, make_router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A TEI keyed by ``?key=`` (behind a gateway that wants one) answers /info only with it:
    the read carries the endpoint's query, as its calls do; a read that fails is logged
    without it."""
    key = "s3cr3t-info-key"
    endpoint = f"{info_upstream.url}/embed?key={key}"
    info_upstream.max_texts = 5
    router = await make_router(provider("t", info_upstream, "tei", endpoint=endpoint))
    assert [q for _, q in info_upstream.reads] == [f"key={key}"]
    assert router.runtimes["t"].stats()["max_texts_per_call"] == 5
    info_upstream.mode = "down"
    with caplog.at_level(logging.DEBUG, logger="embedplex.providers.tei"):
        await make_router(provider("t2", info_upstream, "tei", endpoint=endpoint))
    assert "could not read" in caplog.text
    assert key not in caplog.text
