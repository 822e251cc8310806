"""The pipeline's stages: request id, body limit, authentication, priority, admission,
rate limits.

Each is a small object whose ``enter(exchange)`` runs for every request on every route
(``api/pipeline.py``), in the order ``default_stages`` lists them. A stage refuses by raising an
``EmbedplexError``; the pipeline answers, counts and logs the refusal like any other error.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import os
import re
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

from embedplex.api.pipeline import Exchange, Stage, body_too_large
from embedplex.api.ratelimit import RateLimit
from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
from embedplex.core.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    UnavailableError,
)
from embedplex.core.tenant import ANONYMOUS, STATIC_KEY, Priority, Tenant, current_tenant, lowered

if TYPE_CHECKING:
    from embedplex.config import Settings
    from embedplex.limits import RateLimiter
    from embedplex.state.cache import KeyRejectedError, KeyVerifier

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
        rid = (ex.header(b"x-request-id") or b"")[:_MAX_ID]
        if not rid:
            rid = new_request_id()  # hex digits: nothing to escape
        elif _UNSAFE_ID.search(rid):  # it goes into log lines and back out as a header: escaped
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
    lookup (``state/cache.py``); a new one, one row read and one argon2 verification (a 429 at
    once when too many wait for one).
    The tenant also goes into ``current_tenant`` for the model check in ``Gateway.pick``.
    """

    def __init__(
        self,
        verifier: KeyVerifier,
        static_key: str | None = None,
        *,
        open_paths: tuple[str, ...] | None = None,
        statics: StaticKeys | None = None,
    ) -> None:
        if static_key is not None and not static_key.strip():
            raise ValueError("api_key is set but empty")
        # Imported here, once: the state store (and SQLAlchemy) only when keys are managed, and
        # an import statement in ``enter`` cost each request about a microsecond.
        from embedplex.state.cache import KeyRejectedError

        self._rejected: type[KeyRejectedError] = KeyRejectedError
        self.verifier = verifier
        self.static = static_key.encode() if static_key else None
        self.statics = statics  # the [[api_keys]] table, beside the store's keys
        self.open_paths = _UNAUTHENTICATED if open_paths is None else open_paths

    def enter(self, ex: Exchange) -> Awaitable[None] | None:
        current_tenant.set(ANONYMOUS)
        if ex.path.startswith(self.open_paths):
            return None
        given = _bearer(ex)
        if given.startswith(_MANAGED_PREFIX):
            try:
                tenant = self.verifier.cached(given)
            except self._rejected as exc:
                raise AuthenticationError(exc.reason) from None
            if tenant is None:
                return self._verify(ex, given)
            self._admit(ex, tenant)
            return None
        if self.static is not None and given and hmac.compare_digest(given, self.static):
            self._admit(ex, STATIC_KEY)
            return None
        listed = self.statics.find(given) if self.statics is not None else None
        if listed is not None:
            self._admit(ex, listed)
            return None
        if self.static is not None or self.statics is not None or self.verifier.required:
            raise AuthenticationError("missing or invalid API key")
        return None  # no keys asked for: the anonymous tenant

    async def _verify(self, ex: Exchange, given: bytes) -> None:
        from embedplex.state.cache import (
            KeyRejectedError,
            KeyStoreUnavailableError,
            KeyVerifierBusyError,
        )

        try:
            tenant = await self.verifier.verify(given)
        except KeyRejectedError as exc:
            raise AuthenticationError(exc.reason) from None
        except KeyStoreUnavailableError:
            raise UnavailableError("the key store is unavailable; retry shortly") from None
        except KeyVerifierBusyError:
            # Server-side backpressure, like a full queue: 429 with Retry-After, which the
            # OpenAI clients retry by themselves; a key already verified is never refused so.
            raise OverloadedError(
                "too many new API keys are being verified; retry shortly", retry_after=1
            ) from None
        self._admit(ex, tenant)

    @staticmethod
    def _admit(ex: Exchange, tenant: Tenant) -> None:
        ex.tenant = tenant
        current_tenant.set(tenant)


class StaticKeys:
    """Authenticate by a static table of keys, each its own tenant (``[[api_keys]]``).

    For a few callers that need their own priority or fair-queuing weight without a key store.
    The table is looked up by the SHA-256 of the token presented, so the lookup's time says
    nothing about how much of a key a caller guessed, then compared in constant time.
    """

    def __init__(
        self, keys: Sequence[tuple[str, Tenant]], *, open_paths: tuple[str, ...] | None = None
    ) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Tenant]] = {}
        for secret, tenant in keys:
            if not secret.strip():
                raise ValueError(f"API key {tenant.key_id!r} is empty")
            raw = secret.encode()
            self._by_digest[hashlib.sha256(raw).digest()] = (raw, tenant)
        self.open_paths = _UNAUTHENTICATED if open_paths is None else open_paths

    def find(self, given: bytes) -> Tenant | None:
        """The tenant of the token ``given``, or None."""
        found = self._by_digest.get(hashlib.sha256(given).digest()) if given else None
        if found is None or not hmac.compare_digest(given, found[0]):
            return None
        return found[1]

    def enter(self, ex: Exchange) -> None:
        if ex.path.startswith(self.open_paths):
            return
        tenant = self.find(_bearer(ex))
        if tenant is None:
            raise AuthenticationError("missing or invalid API key")
        ex.tenant = tenant


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
                    if ex.path.startswith(OPEN_PATHS):  # a probe answers whatever a proxy adds
                        continue
                    raise InvalidRequestError(
                        "X-Request-Timeout must be a positive number of seconds",
                        param="X-Request-Timeout",
                        malformed=True,
                        code="invalid_header",
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
    """The chain in its order: request id, authentication, body limit, priority, admission, the
    request's deadline, the key's rate limits (last, so that a request refused while draining
    costs its key nothing). Authentication comes before the body limit: a client without the key
    learns nothing but 401 (not even the body limit), and neither stage reads the body.

    ``keys``: the managed keys of the state store; then ``ManagedKeys`` authenticates (and
    accepts the static keys too: ``api_key`` and ``[[api_keys]]``). ``/metrics`` follows the
    key unless ``metrics_public``.
    """
    stages: list[Stage] = [RequestId()]
    static = settings.api_key.get_secret_value() if settings.api_key is not None else None
    open_paths = None if settings.metrics_public else _WITHOUT_METRICS
    statics = (
        StaticKeys(static_keys(settings), open_paths=open_paths) if settings.api_keys else None
    )
    if keys is not None:
        stages.append(ManagedKeys(keys, static, open_paths=open_paths, statics=statics))
    elif statics is not None:
        stages.append(statics)
    elif static is not None:
        stages.append(StaticKey(static, open_paths=open_paths))
    stages += [BodyLimit(settings.payload_limit), RequestPriority(), Admission()]
    stages.append(RequestDeadline(settings.request_timeout_s))
    if limiter is not None:
        stages.append(RateLimit(limiter, _UNAUTHENTICATED))
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
