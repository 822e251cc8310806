"""Every metric the shipped Grafana dashboard queries exists on a running server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from embedplex.observability import CircuitState

from .conftest import Served

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


async def test_every_queried_metric_exists_after_real_requests(served: Served) -> None:
    c = served.client
    assert (await c.post("/v1/embeddings", json={"input": ["one", "two words"]})).status_code == 200
    assert (await c.post("/embed", json={"inputs": []})).status_code == 400
    served.backend.fail_next = 1
    assert (await c.post("/embed", json={"inputs": "x"})).status_code == 424
    served.backend.die()
    assert (await c.post("/embed", json={"inputs": "x"})).status_code == 424
    assert (await c.post("/embed", json={"inputs": "x"})).status_code == 503
    # Remote providers come with the router; its adapters report through this observer.
    providers = served.telemetry.providers
    providers.on_upstream_call("voyage", 64, 0.2, "200")
    providers.on_retry("voyage", "429")
    providers.on_circuit_state("voyage", CircuitState.CLOSED)
    providers.on_batch_size("voyage", 64)

    exported = {name for name, _ in await served.metrics()}
    wanted = {m for q in queries(json.loads(DASHBOARD.read_text())) for m in METRIC.findall(q)}
    missing = sorted(wanted - exported)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
