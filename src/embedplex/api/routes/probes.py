"""Kubernetes-style probes, Prometheus ``/metrics`` and the Swagger alias."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from embedplex.api.common import gateway, json_response
from embedplex.api.errors import TEI_ERROR_RESPONSES, status_error

router = APIRouter(tags=["health"], responses=TEI_ERROR_RESPONSES)


@router.get("/health/live")
async def live(request: Request) -> Response:
    """The process is up, its event loop answers, and it can still serve.

    503 once a backend has been dead (``Gateway.dead``) for ``liveness_grace_s``: only a
    restart brings it back, so an orchestrator should do one. During the grace period readiness
    is already false, so traffic moves away first.
    """
    dead = gateway(request).dead()
    if dead is not None:
        reason, seconds = dead
        if seconds >= request.app.state.settings.liveness_grace_s:
            return json_response({"status": f"dead: {reason}"}, status=503)
    return json_response({"status": "alive"})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """Models loaded, backends healthy, not draining."""
    ok, reason = gateway(request).ready()
    return json_response({"status": reason}, status=200 if ok else 503)


@router.get("/metrics", tags=["observability"], response_class=PlainTextResponse)
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
