"""Admin API: the provider registry of a running server (``embedplex providers ...``).

Routes here take ``Authorization: Bearer <admin secret>`` (or ``X-Admin-Secret``). The secret is
``admin_secret`` (``EMBEDPLEX_ADMIN_SECRET``) and nothing else: the data-plane ``api_key`` is in
every client's hands, so it never opens the admin API. Without an admin secret the admin API is
off: every admin route answers 403 and says how to turn it on (reads too: the status document
names upstream endpoints and the registry can be changed, neither is for anonymous callers).

A provider added here is checked completely before anything changes: its definition (bounds,
URL shape), its name and served name against what is served, its key's environment variable
against the operator's ``provider_key_envs``, and every address of its endpoint against
``provider_allowed_networks`` (``providers/endpoints.py``); a ``proxy`` is refused (config file
only: ``providers.config.check_run_time``). Any failure is a 422 that leaves no trace. A change
is written to the state store first and only then made to this server's router: a store that
fails is a 503 that changed nothing (never a change served here and undone at the next poll).
A store that does not answer within ``state_timeout_s`` is a 503 that says the change may have
been applied (a COMMIT sent may still land): if it did, every replica, this one included,
applies it at its next poll. Every replica on the same store applies a change within seconds
(``state/providers.py``; docs/keys.md).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from embedplex.api.common import gateway, json_response
from embedplex.api.errors import TEI_ERROR_RESPONSES
from embedplex.core.errors import (
    AuthenticationError,
    ForbiddenError,
    InvalidRequestError,
    ModelNotFoundError,
    RateLimitedError,
    UnavailableError,
    shown,
)
from embedplex.limits import FailureThrottle
from embedplex.providers import PROVIDER_TYPES
from embedplex.providers.config import ProviderConfig, check_run_time
from embedplex.providers.endpoints import (
    EndpointRefused,
    check_endpoint,
    parse_networks,
    redact_provider,
)
from embedplex.providers.router import RemoteRoute, Router
from embedplex.state.providers import ProviderSync
from embedplex.state.store import STORE_ERRORS, StateStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

ADMIN_THROTTLED = "too many wrong admin secrets from this address; retry later"
ADMIN_OFF = (
    "the admin API is off: start the server with an admin secret (EMBEDPLEX_ADMIN_SECRET) to use it"
)
STORE_UNAVAILABLE = "the state store is unavailable; retry shortly"
STORE_UNCONFIRMED = (
    "the state store did not confirm the change in time: it may have been applied; "
    "check (GET) before retrying"
)


async def from_store(store: StateStore, work: Coroutine[Any, Any, T], *, change: bool = False) -> T:
    """``work`` on the state store within ``state_timeout_s``: a store that fails or does not
    answer is a 503, never a 500 or a hang.

    A driver's error is a rolled-back transaction: nothing changed, retry. A ``change`` not
    answered within the bound may still commit behind the caller (its COMMIT already sent), so
    its 503 says so: the client checks before retrying (a retried create would otherwise make
    a second key, its first secret never shown)."""
    try:
        return await store.bounded(work)
    except STORE_ERRORS as exc:
        logger.warning("admin API: the state store failed: %s", type(exc).__name__)
        unconfirmed = change and isinstance(exc, TimeoutError)
        raise UnavailableError(STORE_UNCONFIRMED if unconfirmed else STORE_UNAVAILABLE) from None


def _given_secret(request: Request) -> bytes:
    header = request.headers.get("x-admin-secret")
    if header:
        return header.strip().encode()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


def _counted_as(address: str) -> str:
    """Whose failures an address's are: itself, or for IPv6 its /64 (one host usually holds a
    whole /64, and would otherwise get a fresh bucket per address)."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    except ValueError:
        return address


def require_admin(request: Request) -> None:
    """The one check of every admin route: 403 when the admin API is off, 401 on a bad secret,
    429 for a client address whose wrong secrets are throttled (``limits/failures.py``).

    ``Settings`` refuses a secret shorter than ``MIN_SECRET_CHARS`` at start. A throttled
    address is refused before its secret is looked at, right or wrong: an answer that told a
    right guess apart would leave guessing unthrottled. Other addresses are not affected.
    """
    secret = request.app.state.settings.admin_secret
    if secret is None:
        raise ForbiddenError(ADMIN_OFF)
    failures: FailureThrottle = request.app.state.admin_failures
    client = request.scope.get("client")
    address = _counted_as(client[0]) if client else ""
    wait = failures.wait(address)
    if wait:
        raise RateLimitedError(ADMIN_THROTTLED, retry_after=wait)
    given = _given_secret(request)
    if not hmac.compare_digest(given, secret.get_secret_value().encode()):
        # No secret at all is no guess (a monitor that has none): it is refused, not counted.
        if given and failures.failed(address):
            # One line per throttled stretch of an address; the secret it sent is never logged.
            logger.warning(
                "admin API: too many wrong admin secrets from %s; refusing its admin requests "
                "for %.0fs",
                address or "an unknown address",
                failures.wait(address),
            )
        raise AuthenticationError("missing or invalid admin secret")


# Reads and changes need the same secret; both names stay for the routes that import them.
require_admin_read = require_admin
require_admin_change = require_admin


router = APIRouter(prefix="/api/v1/providers", tags=["admin"], responses=TEI_ERROR_RESPONSES)


class AddProvider(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: ProviderConfig
    serve_as: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        pattern=r"^[!-~]+$",
        description="Also serve this provider under a model name (policy any; printable "
        "ASCII, no spaces).",
    )


def _router(request: Request) -> Router:
    router_ = gateway(request).router
    if router_ is None:
        raise ModelNotFoundError("this server has no provider router", param="providers")
    return router_


def _describe(config: ProviderConfig) -> dict[str, object]:
    # The config holds no key (only api_key_env, the variable's name), unless an endpoint
    # carries one in its query (``?key=``): query values are shown as ***.
    return redact_provider(config.model_dump(mode="json"))


@router.get("", dependencies=[Depends(require_admin_read)])
async def list_providers(request: Request) -> Response:
    runtimes = _router(request).runtimes.values()
    return json_response(
        {
            "object": "list",
            "data": [{**_describe(rt.config), "circuit": rt.health.state.value} for rt in runtimes],
        }
    )


def _check_names(body: AddProvider, request: Request, router_: Router) -> None:
    """The provider's name and served name are free (422 otherwise)."""
    name = body.provider.name
    if name in router_.runtimes:
        raise InvalidRequestError(f"provider {name!r} exists", param="name")
    if body.serve_as is not None:
        gw = gateway(request)
        if body.serve_as in {m.info.name for m in gw.services()}:
            raise InvalidRequestError(
                f"model {body.serve_as!r} is already served", param="serve_as"
            )
        if not gw.allowed.allows(body.serve_as, "embedding"):
            raise InvalidRequestError(
                f"model {body.serve_as!r} is outside the allowed embedding models",
                param="serve_as",
            )


async def _check_new(body: AddProvider, request: Request, router_: Router) -> None:
    """Everything that could refuse ``body``, checked before anything changes (422)."""
    settings = request.app.state.settings
    config = body.provider
    _check_names(body, request, router_)
    try:  # a proxy only from the config file: the guard could not check the upstream behind it
        check_run_time(config)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="proxy") from None
    try:  # the adapter's own checks of the definition (no I/O; nothing is kept)
        PROVIDER_TYPES[config.type](config, router_.client)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="provider") from None
    env = config.api_key_env
    if env is not None and env not in settings.provider_key_envs:
        raise InvalidRequestError(
            f"api_key_env {env!r} is not one of the server's provider_key_envs: a provider "
            "added at run time may only use a key the operator listed",
            param="api_key_env",
        )
    allowed = parse_networks(settings.provider_allowed_networks)
    for field in ("endpoint", "rerank_endpoint"):
        url = getattr(config, field)
        if url is None:  # the vendor's public default
            continue
        try:
            await check_endpoint(url, allowed)
        except EndpointRefused as exc:
            raise InvalidRequestError(str(exc), param=field) from None


def _sync(request: Request) -> ProviderSync:
    sync: ProviderSync = request.app.state.provider_sync
    return sync


@router.post("", dependencies=[Depends(require_admin_change)], status_code=201)
async def add_provider(body: AddProvider, request: Request) -> Response:
    router_ = _router(request)
    gw = gateway(request)
    sync = _sync(request)
    config = body.provider
    await _check_new(body, request, router_)  # outside the lock: it resolves endpoints
    async with sync.lock:
        _check_names(body, request, router_)  # again: a change may have landed meanwhile
        # Stored first (kept for restarts and the other replicas): a store that fails is a
        # 503 before anything here changed.
        await from_store(
            sync.providers.store, sync.providers.put(config, body.serve_as), change=True
        )
        try:
            await sync.put_in(gw, config, body.serve_as)
        except BaseException as exc:
            await _unstore(sync, config.name)  # leave no trace
            if isinstance(exc, ValueError):  # a definition the router refused after all
                raise InvalidRequestError(str(exc), param="provider") from None
            raise
        sync.adopt(config.name, config, body.serve_as)
    return json_response(_describe(config), status=201)


async def _unstore(sync: ProviderSync, name: str) -> None:
    """Undo a stored provider that could not be started here (logged when that fails too:
    the other replicas would then apply it, and this one at its next change)."""
    try:
        await sync.providers.store.bounded(sync.providers.delete(name))
    except STORE_ERRORS as exc:
        logger.error(
            "provider %s could not be started and stays in the state store (%s); remove it",
            name,
            type(exc).__name__,
        )


@router.delete("/{name}", dependencies=[Depends(require_admin_change)])
async def remove_provider(name: str, request: Request) -> Response:
    gw = gateway(request)
    router_ = _router(request)
    sync = _sync(request)
    async with sync.lock:
        users = [
            m.info.name
            for m in gw.services()
            if isinstance(m, RemoteRoute)
            and name in m.route.providers
            and m.route.providers != [name]
        ]
        if users:
            raise InvalidRequestError(
                f"provider {shown(name)} is part of routes {users}; change the config",
                param="name",
            )
        if name not in router_.runtimes:
            raise ModelNotFoundError(f"no provider named {shown(name)}", param="name")
        # Deleted from the store first: a store that fails is a 503 and the provider serves on.
        await from_store(sync.providers.store, sync.providers.delete(name), change=True)
        sync.forget(name)
        sync.take_out(gw, name)  # its requests in flight finish in the background
    return json_response({"deleted": name})
