"""uvicorn's httptools protocol, writing a small response in one call instead of two.

uvicorn writes a response's head as soon as the app sends ``http.response.start`` and the body
when it sends ``http.response.body``: two ``send`` system calls, two TCP segments, and on
loopback two wake-ups of the client, per response. Measured on the event loop of a loaded
server, that first write alone took a fifth of its time. Here the head waits for the body
(or for the loop's next turn, whichever comes first) and both go out in one write.

Each request also gets a ``ConnectionChannel`` in its scope (``api/channel.py``): a lost
connection cancels the task its handler registered (no watcher task per request), and a whole
JSON answer is written by ``send_whole`` in one go, bypassing the two ASGI messages.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from embedplex.api.channel import CHANNEL_KEY

if TYPE_CHECKING:
    from embedplex.serve.forwarded import ForwardedHeaders


class CoalescingTransport:
    """Forwards to ``transport``, holding a response head until the next write or loop turn."""

    __slots__ = ("_held", "_loop", "_transport", "on_close")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        # Asked first on close(); True: it closes the connection its own way (a lingering close).
        self.on_close: Callable[[], bool] | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines([held, data])
        elif data.startswith(b"HTTP/") and data.endswith(b"\r\n\r\n"):
            self._held = data  # a response head: its body is usually written in this same turn
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def write_now(self, data: bytes) -> None:
        """Write ``data`` (after anything held), never holding it."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines([held, data])
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def is_closing(self) -> bool:
        """Asked once per answer (uvicorn's ``on_response_complete``): a method of its own, not
        ``__getattr__``'s, which Python calls only after a failed lookup and its AttributeError."""
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        if self.on_close is None or not self.on_close():
            self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ConnectionChannel:
    """``api/channel.py``'s ``Channel`` for one request (``cycle``) on our connection."""

    __slots__ = ("_cancelled", "_cycle", "_task", "_writer")

    def __init__(self, cycle: RequestResponseCycle, writer: CoalescingTransport) -> None:
        self._cycle = cycle
        self._writer = writer
        self._task: asyncio.Task[object] | None = None
        self._cancelled = False

    @property
    def gone(self) -> bool:
        return self._cycle.disconnected

    def watch(self, task: asyncio.Task[object] | None) -> None:
        self._task = task

    def cancelled_watched(self) -> bool:
        return self._cancelled

    def lost(self) -> None:
        """The client left: cancel the registered task, once."""
        task = self._task
        if task is not None and not self._cancelled:
            self._cancelled = True
            task.cancel()

    def send_whole(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes | memoryview
    ) -> bool:
        """What uvicorn's ``send`` does for a start and a final body message, in one write.

        Only the plain case: anything else (a HEAD, a 204/304, a paused or closed writer, an
        access log to write) returns False for the generic path, which handles it.
        """
        cycle = self._cycle
        if (
            cycle.response_started
            or cycle.disconnected
            or cycle.flow.write_paused
            or cycle.access_log
            or status in (204, 304)
            or cycle.scope["method"] == "HEAD"
        ):
            return False
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        defaults, has_close = _rendered_defaults(cycle.default_headers)
        content: list[bytes | memoryview] = [STATUS_LINE[status], defaults]
        if _render(headers, content):
            has_close = True
        if has_close:
            cycle.keep_alive = False
        if not cycle.keep_alive and not has_close:
            content.append(b"connection: close\r\n")
        content += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        self._writer.write_now(b"".join(content))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self._writer.close()
        cycle.on_response()
        return True


def _render(headers: Sequence[tuple[bytes, bytes]], content: list[bytes | memoryview]) -> bool:
    """Append ``headers`` to ``content`` as uvicorn writes them (checked, names lower-cased),
    less content-length and transfer-encoding (the body's own length is written); True when
    one of them is ``connection: close``.

    uvicorn's checks are character classes, so all the names are checked at once and all the
    values at once, each by deleting the bytes its class allows: what is left is refused.
    """
    if b"".join([name for name, _ in headers]).translate(None, _NAME_BYTES):
        raise RuntimeError("Invalid HTTP header name.")
    if b"".join([value for _, value in headers]).translate(None, _VALUE_BYTES):
        raise RuntimeError("Invalid HTTP header value.")
    has_close = False
    for name, value in headers:
        name = name.lower()
        if name in _OWN_LENGTH:
            continue
        if name == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
            has_close = True
        content += (name, b": ", value, b"\r\n")
    return has_close


_OWN_LENGTH = frozenset((b"content-length", b"transfer-encoding"))


def _allowed(refused: re.Pattern[bytes]) -> bytes:
    """The bytes a one-byte character class ``refused`` does not match (uvicorn's own classes,
    read at import, so the check stays what uvicorn checks): ``bytes.translate`` deletes them
    in one pass, where a regex search runs its engine once per byte."""
    return bytes(b for b in range(256) if refused.fullmatch(bytes((b,))) is None)


_NAME_BYTES = _allowed(HEADER_RE)
_VALUE_BYTES = _allowed(HEADER_VALUE_RE)


# uvicorn's default headers (date, server, --header ones) as written, for the list object it
# holds (a new one each second, when the date changes): rendered once, not per answer.
_defaults: tuple[list[tuple[bytes, bytes]], bytes, bool] = ([], b"", False)


def _rendered_defaults(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    global _defaults
    cached, rendered, has_close = _defaults
    if headers is not cached:  # (the cache holds the list: its identity is not reused)
        content: list[bytes | memoryview] = []
        has_close = _render(headers, content)
        rendered = b"".join(content)
        _defaults = (headers, rendered, has_close)
    return rendered, has_close


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` over a ``CoalescingTransport`` (``uvicorn.Config(http=...)``),
    with a ``ConnectionChannel`` in each request's scope, and proxy headers read into it when
    ``forwarded`` is set (the server then runs with uvicorn's ``proxy_headers`` off)."""

    forwarded: ClassVar[ForwardedHeaders | None] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        wrapped: Any = CoalescingTransport(transport, self.loop)
        self._writer = wrapped
        # The keep-alive bound, kept lazily (``on_response_complete``): when an idle
        # connection is due to close (None while a request runs), and the one timer that
        # checks it.
        self._idle_until: float | None = None
        self._idle_check: asyncio.TimerHandle | None = None
        super().connection_made(wrapped)

    @property
    def keep_alive_armed(self) -> bool:
        """Whether the connection waits for a next request under the keep-alive bound."""
        return self._idle_until is not None

    def _unset_keepalive_if_required(self) -> None:
        self._idle_until = None  # busy: the timer, if it fires meanwhile, lets the connection be

    def on_response_complete(self) -> None:
        """uvicorn's, but the keep-alive timer is not armed anew after every answer and
        cancelled at every next request (a timer handle made, scheduled and unscheduled per
        request): the answer only moves the idle deadline, and one timer per connection checks
        it when it fires, closing the connection if it is still idle by then, else waiting on."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:  # a pipelined request waits: start it
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_until = deadline = self.loop.time() + self.timeout_keep_alive
        if self._idle_check is None:
            self._idle_check = self.loop.call_at(deadline, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_check = None
        until = self._idle_until
        if until is None:
            return  # a request runs: its answer sets the next deadline and timer
        if self.loop.time() < until:
            self._idle_check = self.loop.call_at(until, self._check_idle)
        elif not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle and self.cycle is not None:  # a request (not an upgrade)
            scope: Any = self.scope
            scope[CHANNEL_KEY] = ConnectionChannel(self.cycle, self._writer)
            if self.forwarded is not None:
                self.forwarded.apply(scope)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # uvicorn stops reading while more than 64 KiB of body wait unread and reads on when
        # the app asks for more (``receive``). Once the body is whole the app asks no more, so
        # a pause taken with its last bytes lasted until the answer: a client that left
        # meanwhile went unseen, and its work ran on (a batch of ~250 texts, 276 KB). Reading
        # on costs nothing: a pipelined request behind this one pauses reading again until
        # its turn (``on_headers_complete``).
        self.flow.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._idle_until = None
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        self.client_gone()

    def client_gone(self) -> None:
        """The current request's client has left (``cycle.disconnected`` is set)."""
        cycle = self.cycle
        if cycle is not None and cycle.disconnected:
            channel = cycle.scope.get(CHANNEL_KEY)
            if isinstance(channel, ConnectionChannel):
                channel.lost()
