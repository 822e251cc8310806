"""Fixtures for the router tests: fake upstream servers and routers that close themselves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from embedplex.providers.config import ProviderConfig
from embedplex.providers.router import Router
from upstream_fakes import FakeUpstream, running_upstream


def _server() -> Iterator[FakeUpstream]:
    with running_upstream() as fake:
        yield fake


@pytest.fixture(scope="session")
def _upstream_a() -> Iterator[FakeUpstream]:
    yield from _server()


@pytest.fixture(scope="session")
def _upstream_b() -> Iterator[FakeUpstream]:
    yield from _server()


@pytest.fixture
def upstream(_upstream_a: FakeUpstream) -> Iterator[FakeUpstream]:
    _upstream_a.reset()
    yield _upstream_a
    _upstream_a.reset()


@pytest.fixture
def upstream2(_upstream_b: FakeUpstream) -> Iterator[FakeUpstream]:
    _upstream_b.reset()
    yield _upstream_b
    _upstream_b.reset()


RouterFactory = Callable[..., Any]


@pytest.fixture
async def make_router() -> AsyncIterator[RouterFactory]:
    """``await make_router(config, ...)``: a started Router, closed after the test."""
    made: list[Router] = []

    async def factory(*configs: ProviderConfig, **kw: Any) -> Router:
        kw.setdefault("probe_interval", 3600)  # tests drive probes and sweeps by hand
        kw.setdefault("idle_ttl", 3600)
        router = Router(configs, **kw)
        await router.start()
        made.append(router)
        return router

    yield factory
    for router in made:
        await router.close(drain=False)
