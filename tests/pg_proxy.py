"""A TCP proxy in front of the real PostgreSQL that can stop answering, for the store's bounds.

``mode``: ``"pass"`` forwards both ways; ``"hang"`` keeps every connection open and forwards
nothing (a frozen host or a partition: the client sees no error, only silence), and accepts new
connections without ever reaching the server; ``"slow"`` forwards each chunk ``delay_s`` late.
``hang_after`` (bytes): the first client message that contains them (``b"COMMIT"``) still
reaches the server, then the proxy hangs, so the server acts on it and its answer is lost.
It runs its own event loop in a thread, so in-process tests and server processes can both use
it; a mode change applies to data in flight at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from helpers import free_port


class PgProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.delay_s = 0.5
        self._mode = "pass"
        self.hang_after: bytes | None = None
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()  # set unless hanging or closing; used in _loop only
        self._closing = False
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        self._loop.call_soon_threadsafe(self._update)

    def _update(self) -> None:
        if self._mode == "hang" and not self._closing:
            self._open.clear()
        else:
            self._open.set()

    def url(self, base: str) -> str:
        """``base`` (a postgresql:// URL) pointed at this proxy instead of its own host."""
        parts = urlsplit(base)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_server: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self._open.wait()
                if self._mode == "slow":
                    await asyncio.sleep(self.delay_s)
                if self._closing:
                    break
                if to_server and self.hang_after is not None and self.hang_after in data:
                    self.hang_after = None
                    self._mode = "hang"  # before it is sent: its answer is held
                    self._update()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._open.wait()  # accepted, never answered while hanging
            if self._closing:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(up_writer)
            await asyncio.gather(
                self._pipe(reader, up_writer, to_server=True),
                self._pipe(up_reader, writer, to_server=False),
            )
        finally:
            writer.close()

    async def _serve(self, ready: threading.Event, stop: asyncio.Event) -> None:
        self._update()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        ready.set()
        async with server:
            await stop.wait()
            self._closing = True
            self._update()
            server.close()
            for writer in self._writers:
                writer.close()
            await asyncio.sleep(0.2)  # the handlers see their sockets closed and end

    def run(self, ready: threading.Event, stop: asyncio.Event) -> None:
        self._loop.run_until_complete(self._serve(ready, stop))
        self._loop.close()


@contextmanager
def pg_proxy(base: str) -> Iterator[PgProxy]:
    """A proxy to the PostgreSQL of ``base`` (a URL), running until the block ends."""
    parts = urlsplit(base)
    proxy = PgProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    stop = asyncio.Event()
    ready = threading.Event()
    thread = threading.Thread(target=proxy.run, args=(ready, stop), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield proxy
    finally:
        proxy._loop.call_soon_threadsafe(stop.set)
        thread.join(10)
