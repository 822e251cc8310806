"""The server's per-request channel (api/channel.py, serve/http_protocol.py) on a real uvicorn:
a client that leaves cancels its handler's work, and a whole answer goes out in one write."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from starlette.requests import Request

from embedplex.api.channel import CHANNEL_KEY, Channel
from embedplex.api.common import ClientGoneError, unless_disconnected
from embedplex.api.pipeline import read_body
from embedplex.serve.edge import EdgeLimits
from embedplex.serve.http_protocol import _render
from wire import edge_server, read_all, responses

WAIT_S = 15.0


@contextmanager
def server(app: Any) -> Iterator[int]:
    # Without an access log, as `embedplex serve` runs (with one, uvicorn takes the generic path).
    with edge_server(app, EdgeLimits(), access_log=False) as port:
        yield port


def leaving_client(body: bytes) -> list[str]:
    """A client sends ``body`` and leaves while the handler waits on work that never ends
    (the body read whole, as the pipeline reads it); what the handler saw."""
    started = threading.Event()
    finished = threading.Event()
    outcome: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        outcome.append("channel" if CHANNEL_KEY in scope else "no channel")
        outcome.append(f"read {len(await read_body(receive))} bytes")

        async def work() -> None:
            started.set()
            try:
                await asyncio.Event().wait()  # never answers: only the client's leaving ends it
            except asyncio.CancelledError:
                outcome.append("work cancelled")
                raise

        try:
            await unless_disconnected(Request(scope, receive), work())
        except ClientGoneError:
            outcome.append("client gone")
            task = asyncio.current_task()
            assert task is not None
            outcome.append(f"cancelling {task.cancelling()}")  # the cancel was taken back
        finally:
            finished.set()

    with server(app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
            head = f"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n\r\n"
            s.sendall(head.encode() + body)
            assert started.wait(WAIT_S)
        finished.wait(WAIT_S)
    return outcome


def test_a_client_that_leaves_cancels_the_work_it_was_waiting_for() -> None:
    assert leaving_client(b"") == [
        "channel",
        "read 0 bytes",
        "work cancelled",
        "client gone",
        "cancelling 0",
    ]


def test_a_client_that_leaves_after_a_big_body_is_seen_too() -> None:
    """uvicorn stops reading while more than 64 KiB of body wait unread, and reads on when the
    app asks for more; the app asks no more once the body is whole, so a body whose last
    64 KiB came in one go left the connection unread until the answer: the client's leaving
    went unseen and its work ran on (found with 250 texts, ~276 KB; here from ~262 KB on,
    depending on how the reads split the body)."""
    outcome = leaving_client(b"x" * 300_000)
    assert outcome == [
        "channel",
        "read 300000 bytes",
        "work cancelled",
        "client gone",
        "cancelling 0",
    ]


def test_a_whole_answer_is_one_write_with_the_servers_headers() -> None:
    used: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        channel: Channel = scope[CHANNEL_KEY]
        headers = [(b"X-Answer", b"yes"), (b"content-length", b"999")]  # the body's length wins
        sent = channel.send_whole(201, headers, b'{"a":1}')
        used.append(sent)
        if not sent:  # HEAD: the generic path
            await send({"type": "http.response.start", "status": 201, "headers": headers[:1]})
            await send({"type": "http.response.body", "body": b""})

    with (
        server(app) as port,
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s,
    ):
        s.settimeout(WAIT_S)
        request = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"
        s.sendall(request + request)  # kept alive: two answers, pipelined
        s.sendall(b"HEAD /x HTTP/1.1\r\nhost: t\r\n\r\n")
        s.sendall(b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        data = read_all(s)  # the last request asked to close: the server does
    # HEAD answers have no body but may carry a length: parse the HEAD answer by hand.
    first, second, rest = data.split(b"HTTP/1.1 201 Created\r\n", 3)[1:]
    assert data.count(b"HTTP/1.1 201 Created\r\n") == 4
    for raw in (first, second):
        (_, headers, body) = responses(b"HTTP/1.1 201 Created\r\n" + raw)[0]
        assert body == b'{"a":1}'
        assert headers["content-length"] == "7"
        assert headers["x-answer"] == "yes"
        assert "date" in headers and "server" in headers  # uvicorn's defaults are kept
        assert "connection" not in headers
    last = data[data.rindex(b"HTTP/1.1 201 Created\r\n") :]
    (_, headers, body) = responses(last)[0]
    assert body == b'{"a":1}'
    assert headers["connection"] == "close"
    assert used == [True, True, False, True]
    assert rest  # the HEAD answer and the last one


def test_rendered_headers_are_checked_and_written_as_uvicorn_writes_them() -> None:
    content: list[bytes | memoryview] = []
    headers = [
        (b"X-Answer", b"yes"),
        (b"Content-Length", b"999"),
        (b"transfer-encoding", b"chunked"),
        (b"Connection", b"keep-alive, Close"),
    ]
    assert _render(headers, content) is True  # connection: close among its tokens
    assert b"".join(content) == b"x-answer: yes\r\nconnection: keep-alive, Close\r\n"
    assert _render([(b"x-a", b"1")], content) is False
    for bad in ([(b"x a", b"1")], [(b"x-a", b"1"), (b"x:b", b"2")]):
        with pytest.raises(RuntimeError, match="header name"):
            _render(bad, [])
    for bad in ([(b"x-a", b"1\r\nx-injected: 1")], [(b"x-a", b"ok"), (b"x-b", b"\x00")]):
        with pytest.raises(RuntimeError, match="header value"):
            _render(bad, [])


def test_every_byte_is_checked_as_uvicorns_header_patterns_check_it() -> None:
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    for b in range(256):
        byte = bytes((b,))
        name_refused = HEADER_RE.search(b"x" + byte) is not None
        value_refused = HEADER_VALUE_RE.search(b"v" + byte) is not None
        for header, refused, what in (
            ((b"x" + byte, b"v"), name_refused, "name"),
            ((b"x", b"v" + byte), value_refused, "value"),
        ):
            if refused:
                with pytest.raises(RuntimeError, match=f"header {what}"):
                    _render([(b"x-ok", b"1"), header], [])
            else:
                _render([(b"x-ok", b"1"), header], [])
