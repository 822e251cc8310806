"""Admin API: the provider registry of a running server (``embedplex providers ...``).

Routes here take ``Authorization: Bearer <admin secret>`` (or ``X-Admin-Secret``). The secret is
``admin_secret`` (``EMBEDPLEX_ADMIN_SECRET``), else the server's ``api_key``. With neither set,
reads are open and changes are refused: a server nobody secured should not be reconfigurable
by anyone who can reach it. Changes live in memory only (see docs/router.md).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from embedplex.api.common import gateway, json_response
from embedplex.api.errors import TEI_ERROR_RESPONSES
from embedplex.core.errors import AuthenticationError, InvalidRequestError, ModelNotFoundError
from embedplex.providers.config import ProviderConfig, RouteConfig
from embedplex.providers.router import RemoteModel, RemoteRoute, Router


def _given_secret(request: Request) -> bytes:
    header = request.headers.get("x-admin-secret")
    if header:
        return header.encode()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


def _check(request: Request, *, change: bool) -> None:
    settings = request.app.state.settings
    secret = settings.admin_secret or settings.api_key
    if not secret:  # None, or set but empty: an empty secret would match a missing one
        if change:
            raise AuthenticationError(
                "provider changes need an admin secret: start the server with "
                "EMBEDPLEX_ADMIN_SECRET set"
            )
        return
    if not hmac.compare_digest(_given_secret(request), secret.get_secret_value().encode()):
        raise AuthenticationError("missing or invalid admin secret")


def require_admin_read(request: Request) -> None:
    _check(request, change=False)


def require_admin_change(request: Request) -> None:
    _check(request, change=True)


router = APIRouter(prefix="/api/v1/providers", tags=["admin"], responses=TEI_ERROR_RESPONSES)


class AddProvider(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: ProviderConfig
    serve_as: str | None = Field(
        None, description="Also serve this provider under a model name (policy any)."
    )


def _router(request: Request) -> Router:
    router_ = gateway(request).router
    if router_ is None:
        raise ModelNotFoundError("this server has no provider router", param="providers")
    return router_


def _describe(config: ProviderConfig) -> dict[str, object]:
    # The config holds no secret (only api_key_env, the variable's name): safe to show.
    return config.model_dump(mode="json")


@router.get("", dependencies=[Depends(require_admin_read)])
async def list_providers(request: Request) -> Response:
    runtimes = _router(request).runtimes.values()
    return json_response(
        {
            "object": "list",
            "data": [{**_describe(rt.config), "circuit": rt.health.state.value} for rt in runtimes],
        }
    )


@router.post("", dependencies=[Depends(require_admin_change)], status_code=201)
async def add_provider(body: AddProvider, request: Request) -> Response:
    router_ = _router(request)
    gw = gateway(request)
    if body.provider.name in router_.runtimes:
        raise InvalidRequestError(f"provider {body.provider.name!r} exists", param="name")
    if body.serve_as is not None and body.serve_as in {m.name for m in gw.models}:
        raise InvalidRequestError(f"model {body.serve_as!r} is already served", param="serve_as")
    await router_.add(body.provider)
    if body.serve_as is not None:
        route = RouteConfig(model=body.serve_as, providers=[body.provider.name])
        model = RemoteModel(router_, route)
        request.app.state.telemetry.instrument([model])  # its build info
        await model.start()
        gw.add(model)
    return json_response(_describe(body.provider), status=201)


@router.delete("/{name}", dependencies=[Depends(require_admin_change)])
async def remove_provider(name: str, request: Request) -> Response:
    gw = gateway(request)
    users = [
        m.info.name
        for m in gw.services()
        if isinstance(m, RemoteRoute) and name in m.route.providers and m.route.providers != [name]
    ]
    if users:
        raise InvalidRequestError(
            f"provider {name!r} is part of routes {users}; change the config", param="name"
        )
    await _router(request).remove(name)
    for m in gw.services():
        if isinstance(m, RemoteRoute) and m.route.providers == [name]:
            gw.remove(m.info.name)
    return json_response({"deleted": name})
