"""The HTTP/1.1 side of the bench's stand-in servers (``echo_server``, ``fake_upstream``).

Both must cost next to nothing per request, so that a load run measures the load generator or
the router in front of them, not them: a bare asyncio protocol over httptools, with no
framework, no routing and no header handling. Each server subclasses :class:`StubProtocol` and
writes its own answer when a request is complete; a request httptools cannot parse closes the
connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools


class StubProtocol(asyncio.Protocol):
    """Parses requests; a subclass answers them in ``on_message_complete`` via :meth:`reply`.

    A subclass that needs the body defines ``on_body`` too; one that does not leaves it out, so
    httptools does not call back for it at all.
    """

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def reply(self, response: bytes) -> None:
        """Write one whole response (status line, headers and body)."""
        if self._transport is not None:
            self._transport.write(response)


async def serve_stub(protocol: Callable[[], StubProtocol], port: int) -> None:
    """Serve ``protocol`` on 127.0.0.1:``port`` until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, "127.0.0.1", port)
    async with server:
        await server.serve_forever()
