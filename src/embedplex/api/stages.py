"""The pipeline's stages: request id, body limit, authentication, admission, rate limits.

Each is a small object whose ``enter(exchange)`` runs for every request on every route
(``api/pipeline.py``), in the order ``default_stages`` lists them. A stage refuses by raising an
``EmbedplexError``; the pipeline answers, counts and logs the refusal like any other error.
"""

from __future__ import annotations

import hmac
import itertools
import math
import os
import re
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from embedplex.api.pipeline import Exchange, Stage, body_too_large
from embedplex.api.ratelimit import RateLimit
from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
from embedplex.core.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotReadyError,
    UnavailableError,
)
from embedplex.core.tenant import ANONYMOUS, STATIC_KEY, Tenant, current_tenant

if TYPE_CHECKING:
    from embedplex.config import Settings
    from embedplex.limits import RateLimiter
    from embedplex.state.cache import KeyVerifier

# Open to anyone, as in TEI: probes and docs (``docs_enabled = false`` turns the docs off), and
# /metrics only with ``metrics_public`` (or on --metrics-port, which serves it alone).
OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", "/swagger-ui", "/redoc")
# The admin API checks its own secret (``api/routes/admin.py``), which may differ from the key.
ADMIN_PATHS = ("/api/v1/status", "/api/v1/providers", "/api/v1/keys")

# 32 hex digits like a uuid4: a random per-process prefix and a counter (a uuid4 per request
# cost more than the rest of the request id handling together).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()
_MAX_ID = 128  # bytes of a caller's X-Request-ID kept (it goes into every log line)
_UNSAFE_ID = re.compile(rb"[^\x20-\x7e]")  # what a request id is not: controls, non-ASCII


def new_request_id() -> bytes:
    return f"{_ID_PREFIX}{next(_id_counter):016x}".encode()


class RequestId:
    """Take the caller's ``X-Request-ID`` (or make one), note it, and echo it on the answer."""

    def enter(self, ex: Exchange) -> None:
        rid = (ex.header(b"x-request-id") or b"")[:_MAX_ID] or new_request_id()
        if _UNSAFE_ID.search(rid):  # it goes into log lines and back out as a header: escaped
            rid = _UNSAFE_ID.sub(lambda m: b"\\x%02x" % m[0][0], rid)[:_MAX_ID]
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

    def __init__(self, key: str, *, open_paths: tuple[str, ...] | None = None) -> None:
        if not key.strip():
            # An empty key would match an empty or missing header: refuse to start instead.
            raise ValueError("api_key is set but empty")
        self.key = key.encode()
        self.open_paths = _UNAUTHENTICATED if open_paths is None else open_paths

    def enter(self, ex: Exchange) -> None:
        if ex.path.startswith(self.open_paths):
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
_WITHOUT_METRICS = tuple(p for p in _UNAUTHENTICATED if p != "/metrics")
_MANAGED_PREFIX = b"ep_"


def _bearer(ex: Exchange) -> bytes:
    value = ex.header(b"authorization")
    if value is None:
        return b""
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


class ManagedKeys:
    """Authenticate by a managed key from the state store (``ep_<id>_<secret>``), or by the
    static ``--api-key`` beside them; yields the key's ``Tenant`` (id, priority, models, limits,
    weight). Replaces ``StaticKey`` when the server has a state store.

    Keys are required once the store holds any key (created, even if revoked since) or with
    ``require_api_key``, or when a static key is set; otherwise a request without a valid key
    is the anonymous tenant (the quickstart). A key seen before costs one HMAC and one dict
    lookup (``state/cache.py``); a new one, one row read and one argon2 verification.
    The tenant also goes into ``current_tenant`` for the model check in ``Gateway.pick``.
    """

    def __init__(
        self,
        verifier: KeyVerifier,
        static_key: str | None = None,
        *,
        open_paths: tuple[str, ...] | None = None,
    ) -> None:
        if static_key is not None and not static_key.strip():
            raise ValueError("api_key is set but empty")
        self.verifier = verifier
        self.static = static_key.encode() if static_key else None
        self.open_paths = _UNAUTHENTICATED if open_paths is None else open_paths

    def enter(self, ex: Exchange) -> Awaitable[None] | None:
        from embedplex.state.cache import KeyRejectedError

        current_tenant.set(ANONYMOUS)
        if ex.path.startswith(self.open_paths):
            return None
        given = _bearer(ex)
        if given.startswith(_MANAGED_PREFIX):
            try:
                tenant = self.verifier.cached(given)
            except KeyRejectedError as exc:
                raise AuthenticationError(exc.reason) from None
            if tenant is None:
                return self._verify(ex, given)
            self._admit(ex, tenant)
            return None
        if self.static is not None and given and hmac.compare_digest(given, self.static):
            self._admit(ex, STATIC_KEY)
            return None
        if self.static is not None or self.verifier.required:
            raise AuthenticationError("missing or invalid API key")
        return None  # no keys asked for: the anonymous tenant

    async def _verify(self, ex: Exchange, given: bytes) -> None:
        from embedplex.state.cache import KeyRejectedError, KeyStoreUnavailableError

        try:
            tenant = await self.verifier.verify(given)
        except KeyRejectedError as exc:
            raise AuthenticationError(exc.reason) from None
        except KeyStoreUnavailableError:
            raise UnavailableError("the key store is unavailable; retry shortly") from None
        self._admit(ex, tenant)

    @staticmethod
    def _admit(ex: Exchange, tenant: Tenant) -> None:
        ex.tenant = tenant
        current_tenant.set(tenant)


class Admission:
    """Admit the request, or refuse it before any work.

    Today: while the server drains (SIGTERM), API work is refused with 503 at once, so that a
    request arriving on a kept-alive connection goes elsewhere instead of queueing behind the
    drain; probes and the admin API still answer. A tenant's rate limits come next, in their
    own stage (``api/ratelimit.py``).
    """

    def enter(self, ex: Exchange) -> None:
        if ex.path.startswith(_UNAUTHENTICATED):
            return
        if ex.scope["app"].state.gateway.draining:
            raise NotReadyError("the server is draining")


class RequestDeadline:
    """Set the request's deadline (``core/deadline.py``): ``request_timeout_s``, tightened by
    the client's ``X-Request-Timeout`` (seconds; a bad value is a 400) or the openai SDK's
    ``X-Stainless-Read-Timeout`` (ignored when unreadable). A client can only shorten it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def enter(self, ex: Exchange) -> None:
        seconds, source = self.seconds, "request_timeout_s"
        for key, raw in ex.scope["headers"]:  # one pass; most requests carry neither
            if key == b"x-request-timeout":
                value = _seconds(raw)
                if value is None:
                    raise InvalidRequestError(
                        "X-Request-Timeout must be a positive number of seconds",
                        param="X-Request-Timeout",
                        malformed=True,
                    )
                if value < seconds:
                    seconds, source = value, "X-Request-Timeout"
            elif key == b"x-stainless-read-timeout":
                value = _seconds(raw)
                if value is not None and value < seconds:
                    seconds, source = value, "X-Stainless-Read-Timeout"
        REQUEST_DEADLINE.set(Deadline(time.monotonic() + seconds, seconds, source))


def _seconds(raw: bytes) -> float | None:
    try:
        value = float(raw[:32])
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def default_stages(
    settings: Settings, keys: KeyVerifier | None = None, limiter: RateLimiter | None = None
) -> list[Stage]:
    """The chain in its order: request id, authentication, body limit, admission, the request's
    deadline, the key's rate limits (last, so that a request refused while draining costs its key
    nothing). Authentication comes before the body limit: a client without the key learns
    nothing but 401 (not even the body limit), and neither stage reads the body.

    ``keys``: the managed keys of the state store; then ``ManagedKeys`` authenticates (and
    accepts the static key too). ``/metrics`` follows the key unless ``metrics_public``.
    """
    stages: list[Stage] = [RequestId()]
    static = settings.api_key.get_secret_value() if settings.api_key is not None else None
    open_paths = None if settings.metrics_public else _WITHOUT_METRICS
    if keys is not None:
        stages.append(ManagedKeys(keys, static, open_paths=open_paths))
    elif static is not None:
        stages.append(StaticKey(static, open_paths=open_paths))
    stages += [BodyLimit(settings.payload_limit), Admission()]
    stages.append(RequestDeadline(settings.request_timeout_s))
    if limiter is not None:
        stages.append(RateLimit(limiter, _UNAUTHENTICATED))
    return stages
