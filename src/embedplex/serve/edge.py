"""Limits every connection meets before any route runs: uvicorn's httptools protocol, guarded.

uvicorn bounds none of these with httptools: a client may open connections without limit,
hold one open forever without sending a byte (its keep-alive timer starts only after a first
answer), send its headers one byte every few seconds (any byte cancels that timer), send headers
of any size (httptools buffers a header value whole), or dribble a body forever. Here each
connection walks through these phases, each with its own bound (``EdgeLimits``, from the
``http_*`` settings; docs/security.md lists the defaults):

    accepted      more than ``max_connections`` open: 503, closed
    idle          no request yet, or between keep-alive requests: closed after ``idle_timeout_s``
    head          from a request's first byte: 408 after ``header_timeout_s``;
                  request line and headers over ``max_header_bytes``: 431
    body          from the end of its headers: 408 after ``body_timeout_s`` (closed, if already
                  answered)
    answered      before its body was read (401, 413): closed, the rest of the body never read

Every refusal here is the route's JSON error (``api/errors.py``) with ``Connection: close``,
written in one go; then the connection half-closes and drains for a moment before it closes,
so that the client reads the answer instead of a reset. Pipelined requests keep uvicorn's
handling: answered one after the other, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from embedplex.api.errors import error_response
from embedplex.core.errors import (
    EmbedplexError,
    HeadersTooLargeError,
    InvalidRequestError,
    RequestTimeoutError,
    UnavailableError,
)
from embedplex.serve.forwarded import ForwardedHeaders
from embedplex.serve.http_protocol import OneWriteHttpToolsProtocol

if TYPE_CHECKING:
    from embedplex.config import Settings

logger = logging.getLogger("embedplex.edge")

# How long a connection that got its last answer keeps reading (and dropping) before it closes:
# closing a socket with unread input sends a reset, which can destroy the answer in flight.
LINGER_S = 2.0
# A refusal of each kind is logged at most this often (a flood must not become a log flood).
LOG_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """The bounds of ``EdgeHttpProtocol`` (the ``http_*`` settings)."""

    max_connections: int = 1024
    max_header_bytes: int = 16384
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        return cls(
            max_connections=settings.http_max_connections,
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            idle_timeout_s=settings.http_idle_timeout_s,
        )


def edge_protocol(
    limits: EdgeLimits, forwarded: ForwardedHeaders | None = None
) -> type[EdgeHttpProtocol]:
    """``EdgeHttpProtocol`` bound to ``limits``, for ``uvicorn.Config(http=...)``; with
    ``forwarded``, it reads proxy headers itself (``serve/forwarded.py``)."""
    bound = {"limits": limits, "forwarded": forwarded}
    return cast("type[EdgeHttpProtocol]", type("EdgeHttpProtocol", (EdgeHttpProtocol,), bound))


class _Throttle:
    """Logs the first refusal of a kind, then at most one line per ``LOG_EVERY_S`` with a count."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def note(self, kind: str, message: str, client: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -LOG_EVERY_S) < LOG_EVERY_S:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        more = f" ({skipped} more since the last line)" if skipped else ""
        logger.warning("%s: %s, client %s%s", kind, message, client, more)


_throttle = _Throttle()

# What this process's connections have been refused for, and how many are open: read by the
# metrics at scrape time (``embedplex_connection_refusals_total``, ``embedplex_connections_open``).
REFUSAL_REASONS = (
    "connections",
    "bad_request",
    "headers_too_large",
    "header_timeout",
    "body_timeout",
)
_refusals = dict.fromkeys(REFUSAL_REASONS, 0)
_open = 0


def edge_stats() -> tuple[int, dict[str, int]]:
    """Open connections, and refusals by reason, since the process started."""
    return _open, dict(_refusals)


def _refused(reason: str, message: str, client: object) -> None:
    _refusals[reason] += 1
    _throttle.note(reason, message, client)


class EdgeHttpProtocol(OneWriteHttpToolsProtocol):
    """uvicorn's httptools protocol with the connection limits above (one instance per
    connection; ``limits`` is set on the class by ``edge_protocol``)."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._in_head = False
        self._read = 0  # bytes of the read being parsed
        self._head_raw = 0  # bytes of the reads after the one a head began in, while it lasts
        self._head_span = 0  # the same and the read it began in: at least the head's size
        self._refusal: EmbedplexError | None = None  # why the parser was stopped
        self._done = False  # answered for the last time: what still comes in is dropped
        # The keep-alive a request asked for, while its body is still arriving (see
        # ``_close_if_answered_early``); None when no body is pending.
        self._pending_keep_alive: bool | None = None
        # The keep-alive bound (``on_response_complete``: armed after each answer, lifted by
        # any byte) is the idle bound between requests; ours covers the rest of the idle time.
        self.timeout_keep_alive = self.limits.idle_timeout_s  # type: ignore[assignment]

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        global _open
        _open += 1
        super().connection_made(transport)
        self._writer.on_close = self._close_unread
        if len(self.connections) > self.limits.max_connections:
            _refused("connections", "too many open connections", self.client)
            self._answer(
                UnavailableError("too many open connections; retry later"),
                headers=((b"retry-after", b"1"),),
            )
            return
        self._arm("idle", self.limits.idle_timeout_s, self._idle_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        global _open
        _open -= 1
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with its answer to a request the parser refused made ours (JSON, the
        reason, and logged at most once per LOG_EVERY_S: uvicorn logs every one)."""
        if self._done:
            return  # lingering after a last answer: read and drop
        self._unset_keepalive_if_required()
        self._read = len(data)
        if self._in_head:  # every byte of this read up to the end of the head is head
            self._head_raw += len(data)
            self._head_span += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            refusal, self._refusal = self._refusal, None
            if refusal is None:
                _refused("bad_request", "refused with 400", self.client)
                refusal = InvalidRequestError(
                    f"invalid HTTP request: {exc}", malformed=True, code="invalid_request"
                )
            self._answer(refusal, path=self._path())
            return
        if self._in_head and self._head_raw > self.limits.max_header_bytes:
            self._answer(self._head_too_large(), path=self._path())
            return
        self._close_if_answered_early()
        if self._timer is None:
            self._arm_for_wait()

    def _close_if_answered_early(self) -> None:
        """A request whose body is still arriving may be answered before it is read (a 401, a
        429 at admission): that answer must say ``Connection: close``, because the connection
        is closed after it (``on_response_complete``), and a client that was not told would send
        its next request into the closing connection ("server disconnected without a
        response"). So until the body is complete the cycle is marked not to be kept alive
        (uvicorn then writes the header), and the request's own choice is restored when the body
        completes before the answer starts: the usual case keeps its connection."""
        cycle = self.cycle
        if (
            cycle is not None
            and cycle.more_body
            and not cycle.response_started
            and self._pending_keep_alive is None
        ):
            self._pending_keep_alive = cycle.keep_alive
            cycle.keep_alive = False

    def _arm_for_wait(self) -> None:
        """After a read, a timer for what the connection now waits for, unless one runs.

        Armed here rather than in the parser callbacks: a request whose head (and body) came
        in one read, which is nearly every request, then costs no timer at all.
        """
        cycle = self.cycle
        if self._in_head:  # it began in this read: a head timer runs from any earlier one
            self._arm("head", self.limits.header_timeout_s, self._head_expired)
        elif cycle is not None and cycle.more_body and not cycle.response_complete:
            self._arm("body", self.limits.body_timeout_s, self._body_expired)
        elif (cycle is None or cycle.response_complete) and not self.keep_alive_armed:
            # Bytes that began no request (blank lines): still idle, and not for longer.
            self._arm("idle", self.limits.idle_timeout_s, self._idle_expired)

    # -- parser callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_raw = 0
        self._head_span = self._read  # what of this read came before the head is not known
        self._pending_keep_alive = None
        if self._timer_kind == "idle":
            self._disarm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_span > self.limits.max_header_bytes and (
            len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)  # ": ", CRLF
            > self.limits.max_header_bytes
        ):
            self._refusal = self._head_too_large()
            raise self._refusal  # the parser stops, and data_received answers it
        if self._timer_kind == "head":
            self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._timer_kind == "body":
            self._disarm()
        pending, self._pending_keep_alive = self._pending_keep_alive, None
        cycle = self.cycle
        if pending is not None and cycle is not None and not cycle.response_started:
            cycle.keep_alive = pending  # the whole body came before the answer: keep it alive

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        # Answered before its body was read (401, 413, a 404 on a POST): the rest of the body
        # is not worth reading, and this connection's next request could not be found in it.
        # (Not when a pipelined request is next, or the connection is closing anyway.)
        if cycle.more_body and cycle.response_complete and not (self._in_head or self._done):
            self._linger()  # (it returns at once if the connection is closing)

    # -- limits ---------------------------------------------------------------------------
    def _head_too_large(self) -> HeadersTooLargeError:
        _refused("headers_too_large", "refused with 431", self.client)
        return HeadersTooLargeError(
            f"request line and headers exceed {self.limits.max_header_bytes} bytes"
        )

    def _idle_expired(self) -> None:
        self._timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()

    def _head_expired(self) -> None:
        self._timer = None
        if self.flow.read_paused:  # we stopped reading (a pipelined request runs): not its fault
            self._arm("head", self.limits.header_timeout_s, self._head_expired)
            return
        _refused("header_timeout", "refused with 408", self.client)
        self._answer(
            RequestTimeoutError(
                f"request headers not received within {self.limits.header_timeout_s:g} s"
            ),
            path=self._path(),
        )

    def _body_expired(self) -> None:
        self._timer = None
        waiting = any(cycle is self.cycle for cycle, _ in self.pipeline)
        if self.flow.read_paused or waiting:  # we are not reading it yet: not the client's fault
            self._arm("body", self.limits.body_timeout_s, self._body_expired)
            return
        _refused("body_timeout", "refused with 408", self.client)
        cycle = self.cycle
        answered = cycle.response_started
        # The app stops waiting: its receive() says the client has gone, its answer is dropped.
        cycle.disconnected = True
        cycle.message_event.set()
        self.client_gone()
        if answered:
            self.transport.close()
            return
        error = RequestTimeoutError(
            f"request body not received within {self.limits.body_timeout_s:g} s"
        )
        self._answer(error, path=str(self.scope.get("path", "/")))

    # -- answers --------------------------------------------------------------------------
    def _path(self) -> str:
        """The path of the request being read, once its request line is (uvicorn's ``url``,
        reset as each request begins), for a refusal in its route's dialect; else "/"."""
        url: bytes = getattr(self, "url", b"")
        return url.partition(b"?")[0].decode("latin-1") or "/"

    def _answer(
        self,
        error: EmbedplexError,
        *,
        path: str = "/",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Write ``error`` as the route's JSON error with ``Connection: close``, then linger."""
        response = error_response(error, path)
        body = bytes(response.body)
        head = [STATUS_LINE[response.status_code]]
        for name, value in (
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *headers,
        ):
            head += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self._linger()

    def _close_unread(self) -> bool:
        """uvicorn closes the connection after an answer that says ``Connection: close``; with
        the request's body still unread that close would reset the connection (the kernel
        answers unread data with RST) and the client could lose the answer before reading it.
        So that close lingers instead (True: taken over); any other close is immediate."""
        cycle = self.cycle
        if self._done or cycle is None or not cycle.more_body:
            return False
        self._linger()
        return True

    def _linger(self) -> None:
        """Send what is written and a FIN, drop what still comes in, close within LINGER_S."""
        self._done = True
        self._in_head = False
        transport = self.transport
        if transport.is_closing():
            return
        if not transport.can_write_eof():  # TLS: no half-close
            transport.close()
            return
        transport.write_eof()
        self.flow.resume_reading()
        self._arm("linger", LINGER_S, transport.close)

    def _arm(self, kind: str, seconds: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_kind = kind
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_kind = ""
