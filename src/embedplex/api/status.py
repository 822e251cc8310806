"""``GET /api/v1/status``: queues, batch sizes, circuit states and upstream call counts.

The JSON behind ``embedplex status``: ``models`` is each served model's ``stats()``, and
``providers`` each remote provider's (lanes, AIMD size, health and breaker, counters).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedplex import __version__
from embedplex.api.admin import require_admin_read
from embedplex.api.common import gateway, json_response

router = APIRouter(tags=["admin"])


@router.get("/api/v1/status", dependencies=[Depends(require_admin_read)])
async def status(request: Request) -> Response:
    gw = gateway(request)
    ready, reason = gw.ready()
    return json_response(
        {
            "version": __version__,
            "ready": ready,
            "status": reason,
            "models": gw.stats(),
            "providers": gw.provider_stats(),
        }
    )
