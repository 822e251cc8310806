"""Every metric the shipped Grafana dashboard queries exists on a running server."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from embedplex.api.app import GatewayFactory
from embedplex.backends.fake import FakeBackend
from embedplex.config import Settings
from embedplex.gateway import Gateway
from embedplex.providers.config import RouteConfig
from embedplex.providers.router import RemoteModel, Router
from upstream_fakes import FakeUpstream, Fault, provider, running_upstream

from .conftest import MODEL, fake_factory, serve

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "embedplex.json"
METRIC = re.compile(r"\bembedplex_[a-z0-9_]+\b")


def queries(node: Any) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(queries(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(queries(value))
    return found


def test_dashboard_is_valid_and_covers_the_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "embedplex"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["targets"] for p in panels)
    names = {m for q in queries(dashboard) for m in METRIC.findall(q)}
    assert len(names) > 30


def with_a_route(upstream: FakeUpstream) -> Callable[[FakeBackend], GatewayFactory]:
    """The fake local model plus a route ``remote`` to a provider on ``upstream``."""

    def factory(backend: FakeBackend) -> GatewayFactory:
        def build(s: Settings) -> Gateway:
            router = Router([provider("up", upstream, max_attempts=2)], probe_interval=3600)
            remote = RemoteModel(router, RouteConfig(model="remote", providers=["up"]))
            return Gateway([*fake_factory(backend)(s).services(), remote], router=router)

        return build

    return factory


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as fake:
        yield fake


async def test_every_queried_metric_exists_after_real_requests(upstream: FakeUpstream) -> None:
    async with serve(factory=with_a_route(upstream)) as served:
        c = served.client
        r = await c.post("/v1/embeddings", json={"model": MODEL, "input": ["one", "two words"]})
        assert r.status_code == 200
        assert (await c.post("/embed", json={"model": MODEL, "inputs": []})).status_code == 400
        served.backend.fail_next = 1
        assert (await c.post("/embed", json={"model": MODEL, "inputs": "x"})).status_code == 424
        served.backend.die()
        assert (await c.post("/embed", json={"model": MODEL, "inputs": "x"})).status_code == 424
        assert (await c.post("/embed", json={"model": MODEL, "inputs": "x"})).status_code == 503
        # Remote providers: a routed request that is rate limited once, then answered.
        upstream.script(Fault(status=429, retry_after="0"))
        r = await c.post("/v1/embeddings", json={"model": "remote", "input": ["far away"]})
        assert r.status_code == 200
        exported = {name for name, _ in await served.metrics()}

    wanted = {m for q in queries(json.loads(DASHBOARD.read_text())) for m in METRIC.findall(q)}
    missing = sorted(wanted - exported)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
