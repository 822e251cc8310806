"""Fixtures for the bench tests: an in-process server with the fake backend, and a recording
server that keeps every text it is sent and plays a perfect cache in its ``/metrics``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import httptools
import orjson
import pytest

from embedplex.bench.inprocess import running_server

ServerFactory = Callable[..., Any]

_EMBEDDING = orjson.dumps({"object": "list", "data": [{"index": 0, "embedding": [0.0]}]})


def _response(body: bytes, content_type: str) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class RecordingServer:
    """``with RecordingServer() as srv``: an HTTP server on 127.0.0.1 in a thread of its own.

    Every POST is answered at once with a fixed embedding; ``texts`` keeps each input in order
    of arrival. ``GET /metrics`` says, as embedplex names them, how many inputs a perfect cache
    would have answered (texts seen before) and missed, summed over two label sets; with
    ``metrics=False`` it answers 200 with something that is not Prometheus text. The POST
    numbered ``hold_at`` (from 1), if given, is never answered: a stuck request.
    """

    def __init__(self, *, metrics: bool = True, hold_at: int | None = None) -> None:
        self.metrics = metrics
        self.hold_at = hold_at
        self.posts = 0
        self.texts: list[str] = []
        self.seen: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: list[asyncio.BaseTransport] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> str:
        return "recording server"

    def _record(self, body: bytes) -> None:
        payload = orjson.loads(body)
        texts = payload.get("input", payload.get("inputs"))
        for text in [texts] if isinstance(texts, str) else texts:
            self.texts.append(text)
            if text in self.seen:
                self.hits += 1
            else:
                self.seen.add(text)
                self.misses += 1

    def _metrics(self) -> bytes:
        if not self.metrics:
            return _response(b"not metrics {", "text/plain")
        half = self.hits // 2
        text = (
            "# TYPE embedplex_cache_hits_total counter\n"
            f'embedplex_cache_hits_total{{model="m",tier="memory"}} {half}.0\n'
            f'embedplex_cache_hits_total{{model="m",tier="redis"}} {self.hits - half}.0\n'
            f'embedplex_cache_hits_created{{model="m",tier="memory"}} 1.7e9\n'
            f'embedplex_cache_misses_total{{model="m"}} {self.misses}.0\n'
            f'embedplex_dedupe_joined_total{{model="m"}} 0.0\n'
        )
        return _response(text.encode(), "text/plain; version=0.0.4")

    def _protocol(self) -> asyncio.Protocol:
        server = self

        class Handler(asyncio.Protocol):
            def __init__(self) -> None:
                self.parser = httptools.HttpRequestParser(self)
                self.transport: asyncio.Transport | None = None
                self.body = b""
                self.url = b""

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]
                server._transports.append(transport)

            def data_received(self, data: bytes) -> None:
                self.parser.feed_data(data)

            def on_url(self, url: bytes) -> None:
                self.url = url

            def on_body(self, body: bytes) -> None:
                self.body += body

            def on_message_complete(self) -> None:
                assert self.transport is not None
                if self.url == b"/metrics":
                    self.transport.write(server._metrics())
                else:
                    server._record(self.body)
                    server.posts += 1
                    if server.posts != server.hold_at:
                        self.transport.write(_response(_EMBEDDING, "application/json"))
                self.body = b""

        return Handler()

    async def _close(self) -> None:
        for transport in self._transports:
            transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the transports' connection_lost run

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        create = self._loop.create_server(self._protocol, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(create, self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class FakeServerProcess:
    """Stands in for ``ServerProcess``: starts nothing, keeps each one's arguments and
    environment in ``started``."""

    url = "http://127.0.0.1:9"
    started: ClassVar[list[tuple[list[str], dict[str, str]]]] = []

    def __init__(self, args: list[str], *, log: Path, env: dict[str, str] | None = None) -> None:
        self.started.append((args, env or {}))

    def __enter__(self) -> FakeServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def fake_process() -> type[FakeServerProcess]:
    """A ``FakeServerProcess`` class with a ``started`` list of its own."""

    class Fresh(FakeServerProcess):
        started: ClassVar[list[tuple[list[str], dict[str, str]]]] = []

    return Fresh


@pytest.fixture
def server() -> ServerFactory:
    return running_server


@pytest.fixture
def recording() -> type[RecordingServer]:
    return RecordingServer
