"""``--metrics-port``: ``/metrics`` on a port of its own, served from a daemon thread.

A separate port lets operators keep metrics off the public API port (and out of its auth) and
keeps scrapes answering while the event loop is busy.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServer:
    """A running metrics server; ``stop()`` closes its socket."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        server, thread = start_http_server(port, addr=host, registry=registry)
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
