"""``GET /api/v1/status``: what the server is doing, as one JSON document.

The payload is a plain dict built from ``gateway.stats()`` and the metrics, so other parts (the
remote-provider router adds ``providers``: lanes, AIMD size, health and breaker, counters);
``embedplex status`` renders it.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedplex import __version__
from embedplex.api.common import gateway, json_response
from embedplex.api.errors import TEI_ERROR_RESPONSES
from embedplex.api.routes.admin import require_admin_read
from embedplex.gateway import Gateway
from embedplex.observability import RecentBatches, Telemetry

router = APIRouter(tags=["observability"], responses=TEI_ERROR_RESPONSES)

RECENT_WINDOW_S = 60.0


def build_status(gw: Gateway, telemetry: Telemetry) -> dict[str, Any]:
    """The status document: readiness, then per model its config, live state and recent work."""
    ok, reason = gw.ready()
    metrics = telemetry.metrics
    stats = gw.stats()
    models: dict[str, Any] = {}
    for info in gw.models:
        models[info.name] = {
            "model_id": info.model_id,
            "kind": info.kind,
            "backend": info.backend,
            "device": info.device,
            "dtype": info.dtype,
            "dim": info.dim,
            "max_input_length": info.max_input_length,
            **stats.get(info.name, {}),
            "recent": RecentBatches.combined(
                [metrics.model(n).recent for n in _batch_sources(info.name, stats)],
                RECENT_WINDOW_S,
            ),
            "errors": metrics.failures_by_type(info.name),
        }
    return {
        "version": __version__,
        "ready": ok,
        "status": reason,
        "uptime_s": round(time.monotonic() - metrics.started, 3),
        "models": models,
        "providers": gw.provider_stats(),
        **_cache_section(gw.cache_stats()),
    }


def _cache_section(stats: dict[str, Any] | None) -> dict[str, Any]:
    """``cache``: one row for the shared cache, one per model with its counts (rendered by
    ``embedplex status`` as a table)."""
    if stats is None:
        return {}
    models = stats.pop("models")
    return {"cache": {"(all models)": stats, **models}}


def _batch_sources(model: str, stats: dict[str, Any]) -> list[str]:
    """Whose batches a model's are: its own, or for a remote model its providers' lanes'."""
    own = stats.get(model, {})
    if own.get("kind") == "remote":
        return list(own.get("providers", []))
    return [model]


@router.get("/api/v1/status", dependencies=[Depends(require_admin_read)])
async def status(request: Request) -> Response:
    """Readiness, queue depth, in-flight work, recent throughput and errors per model."""
    return json_response(build_status(gateway(request), request.app.state.telemetry))
