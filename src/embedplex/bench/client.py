"""A minimal HTTP/1.1 keep-alive client for load generation: one connection per worker.

Why not httpx or aiohttp: the load generator shares two cores with the server it measures, so
every microsecond it spends per request is taken from the server. Requests are written as
pre-encoded bytes and responses are parsed by ``httptools`` (llhttp, in C) without keeping the
body; the only per-request Python work is one write, one future and a few callbacks.
Against a trivial server at concurrency 64 on two cores: httpx 130 req/s (6.9 ms client CPU per
request), aiohttp 7,383 req/s (113 us), this client 37,789 req/s (14 us); see docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio

import httptools


class ConnectionClosedError(ConnectionError):
    """The server closed the connection before the response was complete."""


class CannotConnectError(ConnectionError):
    """A run's first connections failed: nothing listens there (or the name does not resolve)."""


class _ResponseProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self.keep_alive = True

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(ConnectionClosedError("connection closed by the server"))

    # httptools callbacks
    def on_message_complete(self) -> None:
        waiter = self._waiter
        self._waiter = None
        self.keep_alive = self._parser.should_keep_alive()
        if waiter is not None and not waiter.done():
            waiter.set_result(self._parser.get_status_code())

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, raw: bytes) -> asyncio.Future[int]:
        """Write one request; the future resolves to the response status code."""
        if self._transport is None or self._transport.is_closing():
            raise ConnectionClosedError("connection is closed")
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._transport.write(raw)
        return waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Connection:
    """One keep-alive connection; ``request`` sends pre-encoded bytes and returns the status."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._proto: _ResponseProtocol | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_ResponseProtocol, self.host, self.port)
        self._proto = proto

    async def request(self, raw: bytes, limit_s: float) -> int:
        if self._proto is None or not self._proto.open:
            await self.connect()
        proto = self._proto
        assert proto is not None
        waiter = proto.send(raw)
        timer = asyncio.get_running_loop().call_later(limit_s, _expire, waiter)
        try:
            status = await waiter
        finally:
            timer.cancel()
        if not proto.keep_alive:
            proto.close()
        return status

    def close(self) -> None:
        if self._proto is not None:
            self._proto.close()
            self._proto = None


def _expire(waiter: asyncio.Future[int]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("request timed out"))


async def connect_all(conns: list[Connection], url: str) -> None:
    """Open every connection of a run at once; when one fails, close the others and raise
    ``CannotConnectError`` naming ``url`` and the cause (every attempt is awaited: none is
    left with an exception nobody reads)."""
    results = await asyncio.gather(*(c.connect() for c in conns), return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is None:
        return
    for c in conns:
        c.close()
    if isinstance(failed, OSError):
        raise CannotConnectError(f"cannot connect to {url}: {failed}") from failed
    raise failed
