"""Answers no upstream should send, from a raw socket (no framework would write them): what
the router reads of them is bounded, and what it says of them never shows a key."""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.client_reqrep import ConnectionKey

from conftest import RouterFactory
from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.core.errors import UpstreamError
from embedplex.core.types import EmbedRequest
from embedplex.providers.config import ProviderConfig, RouteConfig
from embedplex.providers.wire import _translate
from helpers import running
from upstream_fakes import FAST, vector_for

KEY = "AIzaSyTOPSECRETgeminikey123"
MiB = 2**20
Reply = Callable[["RawUpstream", bytes, socket.socket], None]


class RawUpstream:
    """HTTP/1.1 by hand on 127.0.0.1: each request (head and body) is read and recorded, and
    ``reply`` writes whatever bytes it likes back (``send`` counts them). A connection serves
    requests until either side closes it."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.connections = 0
        self.sent = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def url(self, path: str = "/v1/embeddings") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                self.reply(self, head + b"\r\n\r\n" + rest[:length], conn)
        except OSError:
            return  # the client closed it (what an over-cap answer should bring about)
        finally:
            conn.close()

    def close(self) -> None:
        # shutdown, not close alone: it wakes the threads blocked in accept and recv.
        for sock in (self._sock, *self._conns):
            with contextlib.suppress(OSError):  # already gone
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)
        self._accepting.join(10)


@contextmanager
def raw_upstream(reply: Reply) -> Iterator[RawUpstream]:
    server = RawUpstream(reply)
    try:
        yield server
    finally:
        server.close()


def raw_provider(name: str, endpoint: str, **kw: Any) -> ProviderConfig:
    """An openai provider at ``endpoint`` with the fast test knobs."""
    return ProviderConfig(name=name, type="openai", endpoint=endpoint, **{**FAST, **kw})


def answer(request: bytes) -> bytes:
    """The OpenAI answer to ``request`` (a whole request, head and body), as JSON."""
    texts = orjson.loads(request.partition(b"\r\n\r\n")[2])["input"]
    data = [{"index": i, "embedding": vector_for(t).tolist()} for i, t in enumerate(texts)]
    return orjson.dumps({"object": "list", "data": data, "model": "m"})


def head(status: str, *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode()


def plain(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
    body = answer(request)
    up.send(conn, head("200 OK", f"Content-Length: {len(body)}") + body)


# -- 1. a key in the endpoint's query -------------------------------------------------------


def bad_header_echoing_the_request(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
    """A reply aiohttp cannot parse, whose bad line repeats the request line (query, key)."""
    line = request.split(b"\r\n")[0]
    up.send(conn, b"HTTP/1.1 200 OK\r\nBad Header: " + line + b"\r\nContent-Length: 2\r\n\r\n{}")
    conn.close()


async def test_a_key_in_the_endpoint_query_reaches_neither_the_client_nor_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with raw_upstream(bad_header_echoing_the_request) as up:
        settings = Settings(
            local_model=False,
            providers=[
                raw_provider(
                    "gemini", up.url(f"/v1beta/openai/embeddings?key={KEY}"), max_attempts=1
                )
            ],
            routes=[RouteConfig(model="g", providers=["gemini"])],
        )
        async with running(create_app(settings)) as client:
            r = await client.post("/v1/embeddings", json={"model": "g", "input": "x"})
    assert f"key={KEY}".encode() in up.requests[0]  # the key was sent as configured
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert KEY not in r.text
    assert "gemini: RemoteProtocolError" in message and "unreadable answer" in message
    formatter = logging.Formatter()
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert not record.exc_info or KEY not in formatter.formatException(record.exc_info)


@pytest.mark.parametrize(
    "error",
    [
        aiohttp.ConnectionTimeoutError(f"Connection timeout to host http://h/e?key={KEY}"),
        aiohttp.ServerTimeoutError(f"Timeout on http://h/e?key={KEY}"),
        aiohttp.ClientPayloadError(f"payload of http://h/e?key={KEY}"),
        aiohttp.ClientConnectionError(f"http://h/e?key={KEY}"),
        aiohttp.InvalidUrlClientError(f"http://h/e?key={KEY}"),
        aiohttp.ClientConnectorError(
            ConnectionKey("h", 443, True, True, None, None, None), OSError(111, "refused")
        ),
    ],
)
def test_no_transport_error_text_holds_the_url(error: aiohttp.ClientError) -> None:
    text = str(_translate(error))
    assert KEY not in text and "http://" not in text
    assert text.startswith(type(error).__name__)


# -- 2. answers past their cap ----------------------------------------------------------------


CAP = 1 * MiB


@pytest.fixture
async def capped(make_router: RouterFactory) -> Callable[[RawUpstream], Any]:
    """A router with one provider on ``up``, answers capped at ``CAP`` bytes."""

    async def make(up: RawUpstream, path: str = "/v1/embeddings", **kw: Any) -> Any:
        return await make_router(raw_provider("raw", up.url(path), max_response_bytes=CAP, **kw))

    return make


def endless(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
    """A 200 whose chunked body never ends (1 MiB chunks) and is never valid JSON."""
    if len(up.requests) > 1:
        return plain(up, request, conn)
    up.send(conn, head("200 OK", "Transfer-Encoding: chunked", "Content-Type: application/json"))
    chunk = b"%x\r\n%s\r\n" % (MiB, b" " * MiB)
    while True:
        up.send(conn, chunk)


def oversized(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
    """A 200 declaring 100 MiB, sent in full unless the client hangs up."""
    if len(up.requests) > 1:
        return plain(up, request, conn)
    up.send(conn, head("200 OK", f"Content-Length: {100 * MiB}"))
    for _ in range(100):
        up.send(conn, b" " * MiB)


@pytest.mark.parametrize("reply", [endless, oversized], ids=["chunked", "content-length"])
async def test_an_answer_past_the_cap_is_malformed_and_its_connection_dropped(
    capped: Callable[..., Any], reply: Reply
) -> None:
    with raw_upstream(reply) as up:
        router = await capped(up)
        began = time.monotonic()
        with pytest.raises(UpstreamError, match=r"malformed body .*over 1048576 bytes") as info:
            await router.embed(EmbedRequest(inputs=["x"]), ["raw"])
        took = time.monotonic() - began
        assert info.value.status == 200
        assert len(up.requests) == 1  # malformed: not retried
        # Stopped at the cap (loopback buffers hold a few MiB more), quickly.
        assert up.sent < CAP + 32 * MiB
        assert took < 5
        # Its connection is not reused: the next call opens another, and is answered.
        result = await router.embed(EmbedRequest(inputs=["y"]), ["raw"])
    assert len(result.vectors) == 1
    assert up.connections == 2
    health = router.runtimes["raw"].stats()["counters"]
    assert health["outcome_malformed"] == 1


@functools.cache
def bomb() -> bytes:
    """64 MiB of JSON-ish padding in about 64 KiB of gzip."""
    return gzip.compress(b'{"data": [], "pad": "' + b" " * (64 * MiB) + b'"}', compresslevel=9)


def gzip_bomb(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
    """``bomb``, whatever was asked for."""
    body = bomb()
    up.send(
        conn,
        head("200 OK", "Content-Encoding: gzip", f"Content-Length: {len(body)}") + body,
    )


async def test_a_compressed_answer_is_not_asked_for_and_unpacks_only_to_the_cap(
    capped: Callable[..., Any],
) -> None:
    bomb()  # made before memory is counted
    with raw_upstream(gzip_bomb) as up:
        router = await capped(up)
        tracemalloc.start()
        try:
            began = time.monotonic()
            with pytest.raises(UpstreamError, match="over 1048576 bytes"):
                await router.embed(EmbedRequest(inputs=["x"]), ["raw"])
            took = time.monotonic() - began
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert b"\r\nAccept-Encoding: identity\r\n" in up.requests[0]
    assert b"gzip" not in up.requests[0]
    assert peak < 16 * MiB  # the 64 MiB it unpacks to was never held
    assert took < 5


def compressed_answer(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
    body = gzip.compress(answer(request))
    up.send(conn, head("200 OK", "Content-Encoding: gzip", f"Content-Length: {len(body)}") + body)


def chunked_answer(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
    body = answer(request)
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]))
    up.send(conn, head("200 OK", "Transfer-Encoding: chunked") + chunks + b"0\r\n\r\n")


@pytest.mark.parametrize("reply", [plain, chunked_answer, compressed_answer])
async def test_answers_within_the_cap_are_read_whole(
    capped: Callable[..., Any], reply: Reply
) -> None:
    with raw_upstream(reply) as up:
        router = await capped(up)
        for text in ("a", "b"):
            result = await router.embed(EmbedRequest(inputs=[text]), ["raw"])
            assert (result.vectors[0] == vector_for(text)).all()
    assert up.connections == 1  # kept alive between them
    assert all(b"\r\nAccept-Encoding: identity\r\n" in r for r in up.requests)


def mislabelled(coding: str) -> Reply:
    """Plain JSON under a ``Content-Encoding`` that names no compression this wire knows."""

    def reply(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
        body = answer(request)
        up.send(
            conn,
            head("200 OK", f"Content-Encoding: {coding}", f"Content-Length: {len(body)}") + body,
        )

    return reply


@pytest.mark.parametrize("coding", ["none", "UTF-8", "br"])
async def test_an_unknown_content_encoding_is_read_as_identity(
    capped: Callable[..., Any], coding: str
) -> None:
    """Upstreams label plain answers "none" or "UTF-8", and a CDN may say br of one it did
    not compress: an unknown coding is the body as it came (httpx's way), and the JSON parse
    decides. They were 502s and failures for the breaker."""
    with raw_upstream(mislabelled(coding)) as up:
        router = await capped(up)
        result = await router.embed(EmbedRequest(inputs=["a"]), ["raw"])
    assert (result.vectors[0] == vector_for("a")).all()
    assert router.runtimes["raw"].stats()["counters"].get("outcome_malformed", 0) == 0


def huge_error(up: RawUpstream, request: bytes, conn: socket.socket) -> None:
    """A 500 whose 50 MiB body starts with a reason that echoes the request line (its key)."""
    line = request.split(b"\r\n")[0].replace(b'"', b"'")
    reason = b'{"error": {"message": "overloaded: ' + line + b'"}, "pad": "'
    up.send(conn, head("500 Internal Server Error", f"Content-Length: {50 * MiB}") + reason)
    for _ in range(50):
        up.send(conn, b" " * MiB)


async def test_an_error_answer_is_read_only_for_its_reason(capped: Callable[..., Any]) -> None:
    with raw_upstream(huge_error) as up:
        router = await capped(up, f"/v1/embeddings?key={KEY}", max_attempts=1)
        began = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            await router.embed(EmbedRequest(inputs=["x"]), ["raw"])
        took = time.monotonic() - began
        assert up.sent < 32 * MiB  # a few KiB read, the rest in loopback buffers at most
    # Cut at a few KiB (``wire.ERROR_BODY_MAX``) it is not JSON any more: its first words are
    # the reason.
    assert info.value.status == 500
    assert "overloaded: POST /v1/embeddings?key=***" in info.value.message
    assert KEY not in info.value.message
    assert took < 5
