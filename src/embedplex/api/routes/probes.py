"""Kubernetes-style probes, Prometheus ``/metrics`` and the Swagger alias."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from embedplex.api.common import gateway, json_response
from embedplex.api.errors import TEI_ERROR_RESPONSES

router = APIRouter(tags=["health"], responses=TEI_ERROR_RESPONSES)


@router.get("/health/live")
async def live() -> Response:
    """The process is up and its event loop answers."""
    return json_response({"status": "alive"})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """Models loaded, backends healthy, not draining."""
    ok, reason = gateway(request).ready()
    return json_response({"status": reason}, status=200 if ok else 503)


@router.get("/metrics", tags=["observability"], response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    body = request.app.state.telemetry.metrics.render()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/swagger-ui", include_in_schema=False)
async def swagger() -> Response:
    return RedirectResponse("/docs")
