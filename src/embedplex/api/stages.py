"""The pipeline's stages: request id, body limit, authentication, admission.

Each is a small object whose ``enter(exchange)`` runs for every request on every route
(``api/pipeline.py``), in the order ``default_stages`` lists them. A stage refuses by raising an
``EmbedplexError``; the pipeline answers, counts and logs the refusal like any other error.
"""

from __future__ import annotations

import hmac
import itertools
import os
import re
from typing import TYPE_CHECKING

from embedplex.api.pipeline import Exchange, Stage, body_too_large
from embedplex.core.errors import AuthenticationError, NotReadyError
from embedplex.core.tenant import STATIC_KEY

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
    """The chain in its order: request id, authentication, body limit, admission.

    Authentication comes before the body limit: a client without the key learns nothing but
    401 (not even the body limit), and neither stage reads the body.
    """
    stages: list[Stage] = [RequestId()]
    if settings.api_key is not None:
        stages.append(StaticKey(settings.api_key.get_secret_value()))
    stages += [BodyLimit(settings.payload_limit), Admission()]
    return stages
