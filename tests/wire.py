"""Raw-socket helpers: a real uvicorn with the edge protocol, and the HTTP/1.1 bytes a server
writes read back and split into responses by hand (so that a test sees exactly what went on
the wire: pipelining, connection closes, header casing)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from embedplex.serve.edge import EdgeLimits, edge_protocol
from embedplex.serve.forwarded import ForwardedHeaders
from helpers import free_port


@contextmanager
def edge_server(
    app: Any, limits: EdgeLimits, forwarded: ForwardedHeaders | None = None, **config: Any
) -> Iterator[int]:
    """``app`` under uvicorn with ``limits`` and ``forwarded`` (and any other ``uvicorn.Config``
    settings in ``config``); yields the port once it listens."""
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            http=edge_protocol(limits, forwarded),
            log_config=None,
            **config,
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(30)


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection (fails at the socket's timeout)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split raw bytes into (status, headers, body) by Content-Length."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out
