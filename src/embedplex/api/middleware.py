"""Pure ASGI middleware: request id, body size limit, static API key.

Pure ASGI (not ``BaseHTTPMiddleware``) keeps the hot path cheap and lets client disconnects
reach the route.
"""

from __future__ import annotations

import hmac
import itertools
import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedplex.api.errors import error_response
from embedplex.core.errors import AuthenticationError, PayloadTooLargeError

# /metrics is open as in TEI; serve it on --metrics-port to keep it off a public port.
_OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", "/swagger-ui", "/redoc")
# Admin routes check their own secret (embedplex.api.routes.admin.require_admin).
_ADMIN_PATHS = ("/api/v1/status", "/api/v1/providers")


# 32 hex digits like a uuid4: a random per-process prefix and a counter (a uuid4 per request
# cost more than the rest of the request id handling together).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()


def _new_request_id() -> bytes:
    return f"{_ID_PREFIX}{next(_id_counter):016x}".encode()


def take_request_id(scope: Scope) -> bytes:
    """The caller's ``X-Request-ID`` (or a new one), noted in ``scope["state"]``."""
    rid = b""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            rid = value[:128]
            break
    if not rid:
        rid = _new_request_id()
    scope.setdefault("state", {})["request_id"] = rid.decode("latin-1")
    return rid


def content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def check_api_key(scope: Scope, key: bytes) -> None:
    """Raise AuthenticationError unless ``Authorization: Bearer <key>`` is given."""
    given = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                given = token.strip()
            break
    if not hmac.compare_digest(given, key):
        raise AuthenticationError("missing or invalid API key")
    # Logs and spans name the caller by key id; with one static key that id is "static".
    scope.setdefault("state", {})["key_id"] = "static"


class RequestIdMiddleware:
    """Accept ``X-Request-ID`` (or make one), keep it in ``scope["state"]``, echo it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = take_request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = body_too_large(self.limit)
        length = content_length(scope)
        if length is not None and length > self.limit:
            await error_response(error, scope["path"])(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await error_response(error, scope["path"])(scope, receive, send)


class _TooLarge(BaseException):
    pass


def body_too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body exceeds the {limit} byte limit")


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` on every route but probes and docs."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_OPEN_PATHS + _ADMIN_PATHS):
            await self.app(scope, receive, send)
            return
        try:
            check_api_key(scope, self.key)
        except AuthenticationError as error:
            await error_response(error, scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)
