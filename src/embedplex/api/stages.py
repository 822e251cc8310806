"""The pipeline's stages: request id, body limit, authentication, priority, admission.

Each is a small object whose ``enter(exchange)`` runs for every request on every route
(``api/pipeline.py``), in the order ``default_stages`` lists them. A stage refuses by raising an
``EmbedplexError``; the pipeline answers, counts and logs the refusal like any other error.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from embedplex.api.pipeline import Exchange, Stage, body_too_large
from embedplex.core.errors import AuthenticationError, InvalidRequestError, NotReadyError
from embedplex.core.tenant import STATIC_KEY, Priority, Tenant, lowered

if TYPE_CHECKING:
    from embedplex.config import Settings

# Open to anyone, as in TEI: probes, docs and /metrics (serve it on --metrics-port to keep it
# off a public port).
OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", "/swagger-ui", "/redoc")
# The admin API checks its own secret (``api/routes/admin.py``), which may differ from the key.
ADMIN_PATHS = ("/api/v1/status", "/api/v1/providers")

# 32 hex digits like a uuid4: a random per-process prefix and a counter (a uuid4 per request
# cost more than the rest of the request id handling together).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()
_MAX_ID = 128  # bytes of a caller's X-Request-ID kept (it goes into every log line)


def new_request_id() -> bytes:
    return f"{_ID_PREFIX}{next(_id_counter):016x}".encode()


class RequestId:
    """Take the caller's ``X-Request-ID`` (or make one), note it, and echo it on the answer."""

    def enter(self, ex: Exchange) -> None:
        rid = (ex.header(b"x-request-id") or b"")[:_MAX_ID] or new_request_id()
        ex.state["request_id"] = rid.decode("latin-1")
        ex.response_headers.append((b"x-request-id", rid))


class BodyLimit:
    """Refuse bodies over ``limit`` bytes (413): by Content-Length here, and while the body
    streams in (the pipeline reads it against ``exchange.body_limit``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def enter(self, ex: Exchange) -> None:
        length = ex.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            raise body_too_large(self.limit)
        ex.body_limit = self.limit


class StaticKey:
    """Authenticate by the server's one ``--api-key``: ``Authorization: Bearer <key>``.

    The request's tenant becomes ``STATIC_KEY`` (key id ``"static"``); without a key configured
    this stage is not in the chain and every request is the anonymous tenant. Open and admin
    paths pass unauthenticated (the admin routes check their own secret).
    """

    def __init__(self, key: str) -> None:
        if not key:
            # An empty key would match an empty or missing header: refuse to start instead.
            raise ValueError("api_key is set but empty")
        self.key = key.encode()

    def enter(self, ex: Exchange) -> None:
        if ex.path.startswith(_UNAUTHENTICATED):
            return
        given = b""
        value = ex.header(b"authorization")
        if value is not None:
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                given = token.strip()
        if not hmac.compare_digest(given, self.key):
            raise AuthenticationError("missing or invalid API key")
        ex.tenant = STATIC_KEY


_UNAUTHENTICATED = OPEN_PATHS + ADMIN_PATHS


def _bearer(ex: Exchange) -> bytes:
    """The token of ``Authorization: Bearer <token>``; empty when there is none."""
    value = ex.header(b"authorization")
    if value is not None:
        scheme, _, token = value.partition(b" ")
        if scheme.lower() == b"bearer":
            return token.strip()
    return b""


class StaticKeys:
    """Authenticate by a static table of keys, each its own tenant (``[[api_keys]]``).

    For a few callers that need their own priority or fair-queuing weight without a key store.
    The table is looked up by the SHA-256 of the token presented, so the lookup's time says
    nothing about how much of a key a caller guessed, then compared in constant time.
    """

    def __init__(self, keys: Sequence[tuple[str, Tenant]]) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Tenant]] = {}
        for secret, tenant in keys:
            if not secret:
                raise ValueError(f"API key {tenant.key_id!r} is empty")
            raw = secret.encode()
            self._by_digest[hashlib.sha256(raw).digest()] = (raw, tenant)

    def enter(self, ex: Exchange) -> None:
        if ex.path.startswith(_UNAUTHENTICATED):
            return
        given = _bearer(ex)
        found = self._by_digest.get(hashlib.sha256(given).digest()) if given else None
        if found is None or not hmac.compare_digest(given, found[0]):
            raise AuthenticationError("missing or invalid API key")
        ex.tenant = found[1]


class RequestPriority:
    """``X-Embedplex-Priority: batch``: a request lowers its own priority below its key's.

    It may never raise it (``interactive`` with a ``batch`` key stays ``batch``), so the header
    needs no trust; an unknown value is refused (422) rather than silently ignored. The embed
    and rerank bodies' ``priority`` field does the same per request (``api/common.tenant_of``).
    """

    HEADER = b"x-embedplex-priority"

    def enter(self, ex: Exchange) -> None:
        value = ex.header(self.HEADER)
        if value is None or ex.path.startswith(_UNAUTHENTICATED):
            return
        try:
            asked = Priority(value.decode("latin-1").strip().lower())
        except ValueError:
            raise InvalidRequestError(
                "X-Embedplex-Priority must be interactive or batch",
                param="X-Embedplex-Priority",
            ) from None
        ex.tenant = lowered(ex.tenant, asked)


class Admission:
    """Admit the request, or refuse it before any work.

    Today: while the server drains (SIGTERM), API work is refused with 503 at once, so that a
    request arriving on a kept-alive connection goes elsewhere instead of queueing behind the
    drain; probes and the admin API still answer. Per-tenant limits belong here.
    """

    def enter(self, ex: Exchange) -> None:
        if ex.path.startswith(_UNAUTHENTICATED):
            return
        if ex.scope["app"].state.gateway.draining:
            raise NotReadyError("the server is draining")


def default_stages(settings: Settings) -> list[Stage]:
    """The chain in its order: request id, body limit, authentication, priority, admission."""
    stages: list[Stage] = [RequestId(), BodyLimit(settings.payload_limit)]
    if settings.api_keys:
        stages.append(StaticKeys(static_keys(settings)))
    elif settings.api_key is not None:
        stages.append(StaticKey(settings.api_key.get_secret_value()))
    stages.append(RequestPriority())
    stages.append(Admission())
    return stages


def static_keys(settings: Settings) -> list[tuple[str, Tenant]]:
    """``[[api_keys]]`` and ``api_key`` as (secret, tenant) pairs."""
    keys = [
        (k.key.get_secret_value(), Tenant(key_id=k.id, priority=k.priority, weight=k.weight))
        for k in settings.api_keys
    ]
    if settings.api_key is not None:
        keys.append((settings.api_key.get_secret_value(), STATIC_KEY))
    return keys
