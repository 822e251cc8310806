"""The one request pipeline: the ASGI chain every HTTP request passes, on every route.

    request id -> body limit -> authentication (-> tenant) -> admission
      -> the tenant's rate limits                                           the stages
      -> the handler: a JSON POST route straight from bytes, or the FastAPI app
      -> metrics, the request span and the access log                       the observer

Why one chain, written here rather than as a middleware stack: on two cores every microsecond of
Python per request on the event loop is taken from inference, and a stack of ASGI middleware
costs a coroutine frame, a ``send`` wrapper and a ``try`` per concern, while FastAPI's routing,
dependency solving and ``json.loads``-then-validate cost more than an embed route itself. So the
stages are plain objects called in a loop over one ``Exchange``; the JSON POST routes (embed,
rerank, tokenize, batch, admin changes: ``api/routes/table.py``) are validated straight from
the body bytes with ``model_validate_json`` and called directly; every other request (GET
routes, docs, 404s and 405s) goes to the FastAPI app, which keeps all routes registered for
OpenAPI. Both kinds come after the same stages and are observed by the same observer, so a
stage added once (``Pipeline(stages=...)``) applies to every route, and an answer is counted
and logged the same way whichever side wrote it.

A stage refuses by raising an ``EmbedplexError``: the pipeline answers it in the route's
dialect (``api/errors.py``) and the error's ``kind`` is what metrics and the log call it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedplex.api.channel import CHANNEL_KEY, Channel
from embedplex.api.common import ClientGoneError
from embedplex.api.errors import error_response, invalid_body
from embedplex.api.observe import RequestObserver, RequestRecord, scope_record
from embedplex.api.pacing import PACED_KINDS, RefusalPacer
from embedplex.api.responses import JsonResponse
from embedplex.core.errors import (
    BodyTooLargeError,
    EmbedplexError,
    NotReadyError,
    UnsupportedEncodingError,
)
from embedplex.core.tenant import ANONYMOUS, Tenant

logger = logging.getLogger(__name__)

Handler = Callable[[Any, Request], Awaitable[Response]]


class JsonRoute(NamedTuple):
    """A JSON POST route the pipeline serves itself.

    ``guard`` runs before the body is read (the admin secret check): a caller it refuses learns
    nothing about the schema, and costs no parsing. ``admit`` too (refuse under overload): a
    refusal must stay cheap when clients retry at once, or refusals eat the CPU the accepted
    requests need.
    """

    schema: type[BaseModel]
    handler: Handler
    guard: Callable[[Request], None] | None = None
    admit: Callable[[Request], None] | None = None


_EMPTY_BODY = [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
# The one content coding a body is read in (a gzip body read as JSON was a misleading 400).
_IDENTITY = (b"identity", b"")


class Exchange:
    """One request on its way through the pipeline: what the stages read and fill in.

    ``state`` is the ASGI scope's state (``request.state`` in a route): the stages put the
    request id, the tenant and the ``RequestRecord`` there, where routes find them.
    """

    __slots__ = (
        "body_limit",
        "finishers",
        "method",
        "path",
        "receive",
        "record",
        "response_headers",
        "scope",
        "span",
        "start",
        "state",
    )

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.start = time.perf_counter()
        self.scope = scope
        self.receive = receive
        self.path: str = scope["path"]
        self.method: str = scope["method"]
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        self.state: dict[str, Any] = state
        self.record = state["record"] = RequestRecord()
        state["tenant"] = ANONYMOUS
        # Headers every answer carries (the request id; later, rate-limit headers).
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.body_limit: int | None = None  # bytes; enforced while the body streams in
        self.span: Any = None  # the observer's (span, context token) when tracing
        self.finishers: list[Finisher] | None = None

    def at_finish(self, finisher: Finisher) -> None:
        """Call ``finisher(exchange, status)`` when the request is over, however it ended
        (answered, refused, failed, client gone, task cancelled): a stage's release hook.
        Finishers are synchronous, so they run even in a cancelled task, and must not raise.
        One may return an awaitable (a release that goes on in a task of its own): before a
        route's answer is written the pipeline waits for it, so that a client that sends its
        next request on receiving the answer finds the slot back (``finish_before_answer``)."""
        if self.finishers is None:
            self.finishers = []
        self.finishers.append(finisher)

    def header(self, name: bytes) -> bytes | None:
        """The first value of request header ``name`` (lower case), or None."""
        for key, value in self.scope["headers"]:
            if key == name:
                return value  # type: ignore[no-any-return]
        return None

    @property
    def tenant(self) -> Tenant:
        tenant: Tenant = self.state["tenant"]
        return tenant

    @tenant.setter
    def tenant(self, tenant: Tenant) -> None:
        self.state["tenant"] = tenant


Finisher = Callable[["Exchange", int], Awaitable[None] | None]


class Stage(Protocol):
    """One step every request takes before its handler.

    ``enter`` refuses by raising an ``EmbedplexError``; it returns an awaitable when it has to
    wait (a key store, a shared limiter), else None, so a synchronous stage costs one call.
    """

    def enter(self, ex: Exchange) -> Awaitable[None] | None: ...


class Pipeline:
    """The ASGI app in front of everything: ``stages``, then ``routes`` or ``app``.

    ``routes`` maps a path to the schema and handler of its JSON POST route; ``app`` (the
    FastAPI app's own ``__call__``) serves everything else.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        stages: Sequence[Stage],
        routes: Mapping[str, JsonRoute],
        observer: RequestObserver,
        pacer: RefusalPacer | None = None,
        owner: Any = None,
        whole_writes: bool = True,
    ) -> None:
        """``pacer``: holds overload refusals past a fast rate (``api/pacing.py``); ``owner``:
        the app that handlers reach as ``request.app``, put in each scope, so that a server can
        call the pipeline straight (``EmbedplexApp.entry``); ``whole_writes``: a JSON answer is
        written by the connection in one go (``api/channel.py``), which a middleware around the
        pipeline that adds headers through ``send`` (CORS) would not see: off under one."""
        self.app = app
        self.owner = owner
        self.whole_writes = whole_writes
        self.stages = list(stages)
        self.routes = dict(routes)
        self.observer = observer
        self.pacer = pacer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and websockets, if ever): the app's own
            await self.app(scope, receive, send)
            return
        if self.owner is not None:
            scope["app"] = self.owner
        ex = Exchange(scope, receive)
        observer = self.observer
        observer.start(ex)
        status = 500
        try:
            response = await self._handle(ex)
            if response is None:
                status = await self._forward(ex, send)
            else:
                status = response.status_code
                pacer = self.pacer
                if status == 429 and pacer is not None and ex.record.error_type in PACED_KINDS:
                    await pacer.pace()
                response.raw_headers.extend(ex.response_headers)
                if ex.finishers is not None:
                    await finish_before_answer(ex, status)
                # Our server writes a whole JSON answer in one go (api/channel.py).
                channel: Channel | None = scope.get(CHANNEL_KEY) if self.whole_writes else None
                if (
                    channel is None
                    or type(response) is not JsonResponse
                    or not channel.send_whole(status, response.raw_headers, response.body)
                ):
                    await response(scope, receive, send)
        finally:
            if ex.finishers is not None:
                for finisher in ex.finishers:
                    finisher(ex, status)
            observer.finish(ex, status)

    async def _handle(self, ex: Exchange) -> Response | None:
        """Run the stages, then a JSON route; None when the FastAPI app should answer."""
        try:
            for stage in self.stages:
                pending = stage.enter(ex)
                if pending is not None:
                    await pending
            route = self.routes.get(ex.path) if ex.method == "POST" else None
            if route is None:
                return None
            request = Request(ex.scope, ex.receive)
            if route.guard is not None:
                route.guard(request)
            if route.admit is not None:
                route.admit(request)
            coding = ex.header(b"content-encoding")
            if coding is not None and coding.strip().lower() not in _IDENTITY:
                raise UnsupportedEncodingError(
                    f"Content-Encoding {coding.decode('latin-1')[:64]!r} is not supported: "
                    "send the JSON body as it is"
                )
            body = await read_body(ex.receive, ex.body_limit)
            if not body.strip():  # as FastAPI words it: no body is a missing field
                raise invalid_body(_EMPTY_BODY)
            try:
                parsed = route.schema.model_validate_json(body)
            except ValidationError as exc:
                raise invalid_body(exc.errors(include_url=False)) from None
            return await route.handler(parsed, request)
        except EmbedplexError as exc:
            return refuse(ex.scope, exc)
        except ClientGoneError:
            return client_gone(ex.scope)
        except asyncio.CancelledError:
            return cut_off(ex.scope)
        except Exception:
            logger.exception("unhandled error on %s", ex.path)
            return internal_error(ex.scope)

    async def _forward(self, ex: Exchange, send: Send) -> int:
        """Let the FastAPI app answer; return the status it sent."""
        status = 0  # none sent yet
        headers = ex.response_headers
        scope = ex.scope
        if ex.method == "HEAD":
            # Answered as GET: TEI (and Starlette's own routes) answer HEAD on every GET route,
            # which FastAPI's do not (405), and load balancers probe with it. The server, whose
            # scope still says HEAD, writes the head alone (uvicorn drops a HEAD's body).
            scope = {**scope, "method": "GET"}

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        receive = ex.receive if ex.body_limit is None else _limited(ex.receive, ex.body_limit)
        try:
            await self.app(scope, receive, send_with_headers)
        except _TooLarge:
            if not status:
                error = body_too_large(ex.body_limit or 0)
                status = await self._send(refuse(scope, error), ex, send)
        except asyncio.CancelledError:
            if not status:
                status = await self._send(cut_off(scope), ex, send)
        except Exception:
            # FastAPI's last-resort handler (app.py) has answered and logged it, then re-raised
            # it for the server to log again: once is enough.
            if not status:
                logger.exception("unhandled error on %s", ex.path)
                status = await self._send(internal_error(scope), ex, send)
            scope_record(scope).error_type = scope_record(scope).error_type or "internal"
        return status or 500

    @staticmethod
    async def _send(response: Response, ex: Exchange, send: Send) -> int:
        response.raw_headers.extend(ex.response_headers)
        await response(ex.scope, ex.receive, send)
        return response.status_code


async def finish_before_answer(ex: Exchange, status: int) -> None:
    """Run ``ex``'s finishers now, the answer ready but not written, and wait for what they
    left running (a limit's release in Redis): a sequential client must not be refused for the
    request it just got its answer to, by another replica that saw the slot still held. Waiting
    does not cancel that work: if this task is cancelled, it goes on in its own task."""
    finishers, ex.finishers = ex.finishers or [], None
    pending = [p for finisher in finishers if (p := finisher(ex, status)) is not None]
    if pending:
        await asyncio.wait([asyncio.ensure_future(p) for p in pending])


def refuse(scope: Scope, exc: EmbedplexError) -> Response:
    """The answer to ``exc`` in the route's dialect; its ``kind`` is what metrics count.

    Every refusal goes through here: the stages', the JSON routes' and FastAPI's handlers'.
    """
    scope_record(scope).error_type = exc.kind
    return error_response(exc, scope["path"])


def client_gone(scope: Scope) -> Response:
    """499 (nginx's "client closed request"): nobody reads it, but metrics and the log do."""
    scope_record(scope).error_type = "client_gone"
    return Response(status_code=499)


def cut_off(scope: Scope) -> Response:
    """The answer to a request whose task the server cancelled: uvicorn does so only when the
    graceful shutdown period ends with the request still running. The documented JSON 503 (and
    its log line, by the observer) rather than uvicorn's plain-text 500; the task then ends
    normally, its cancellation answered."""
    return refuse(
        scope,
        NotReadyError(
            "the server shut down before this request finished (graceful_shutdown_s); retry"
        ),
    )


def internal_error(scope: Scope) -> Response:
    """A server fault: a generic 500, the details only in the server log."""
    scope_record(scope).error_type = "internal"
    return error_response(EmbedplexError("internal server error"), scope["path"])


def body_too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"request body exceeds the {limit} byte limit")


async def read_body(receive: Receive, limit: int | None = None) -> bytes:
    """The whole request body; BodyTooLargeError past ``limit`` bytes."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # disconnected before the body was complete
            raise ClientGoneError
        chunk = message.get("body", b"")
        seen += len(chunk)
        if limit is not None and seen > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _TooLarge(BaseException):
    """Raised from ``receive`` inside the FastAPI app: a BaseException, so that its body
    parsing (which turns an ``Exception`` into a 400) lets it through to the pipeline."""


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
        return message

    return limited_receive
