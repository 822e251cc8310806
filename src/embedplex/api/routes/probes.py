"""Kubernetes-style probes, Prometheus ``/metrics`` and the Swagger alias."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import RedirectResponse, Response

from embedplex.api.common import gateway, json_response
from embedplex.api.errors import status_error

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> Response:
    """The process is up and its event loop answers."""
    return json_response({"status": "alive"})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """Models loaded, backends healthy, not draining."""
    ok, reason = gateway(request).ready()
    return json_response({"status": reason}, status=200 if ok else 503)


@router.get("/metrics", tags=["observability"])
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry.

    With ``--metrics-port`` the metrics live on that port only (a port an operator can keep
    off the public network); here they are then a 404.
    """
    if request.app.state.settings.metrics_port is not None:
        raise status_error(404, "/metrics is served on the metrics port only")
    body = request.app.state.telemetry.metrics.render()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/swagger-ui", include_in_schema=False)
async def swagger(request: Request) -> Response:
    if not request.app.state.settings.docs_enabled:
        raise status_error(404, "Not Found")
    return RedirectResponse("/docs")
