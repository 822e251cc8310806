"""What our HTTP server (``serve/http_protocol.py``) offers a request beyond ASGI, per request.

Two things a routed request paid for on every call: a watcher task to notice the client leave
(``receive()`` awaited in a task of its own, then cancelled) and a response sent as two ASGI
messages through uvicorn's generic ``send`` (the head checked header by header, held, then
joined with the body). The server already knows when a connection is lost and has the socket at
hand, so it puts a ``Channel`` in the scope under ``CHANNEL_KEY``: the handler registers its
task to be cancelled when the client leaves, and a complete JSON answer goes out in one write.
Under any other ASGI server (tests' ASGI transports) the key is absent and the portable paths
(``api/common.py``'s watcher, the response's own ``__call__``) are used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

CHANNEL_KEY = "embedplex.channel"


class Channel(Protocol):
    """One request's link to its connection."""

    @property
    def gone(self) -> bool:
        """The client has left (the connection was lost before the answer was complete)."""

    def watch(self, task: asyncio.Task[object] | None) -> None:
        """Cancel ``task`` if the client leaves while it is registered (None: unregister)."""

    def cancelled_watched(self) -> bool:
        """Whether the client's leaving cancelled the registered task."""

    def send_whole(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes | memoryview
    ) -> bool:
        """Write a whole answer (``headers`` without content-length) in one write; False when
        this answer needs the generic path (it then sends it the ASGI way)."""
