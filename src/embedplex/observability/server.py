"""``--metrics-port``: ``/metrics`` on a port of its own, served from a daemon thread.

A separate port lets operators keep metrics off the public API port (and out of its auth) and
keeps scrapes answering while the event loop is busy.

Not ``prometheus_client.start_http_server``: that one starts a thread per connection with no
read timeout and no cap, so idle connections (a port scan, a slow client) pile up threads and
file descriptors until the API port and the probes starve. Here a connection that sends
nothing for ``timeout_s`` is closed, and past ``max_connections`` at once a new one is closed
at accept; a scraper (one connection every few seconds) never comes near either.
"""

from __future__ import annotations

import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

# A scrape is one short request; 10 s is far past any real one and bounds an idle connection.
TIMEOUT_S = 10.0
# Connections served at once: a few scrapers, with room to spare.
MAX_CONNECTIONS = 32


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once; the rest are closed."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], handler: type[Any], max_connections: int, family: int
    ) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: refused, no thread started
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: give its slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _handler(registry: CollectorRegistry, timeout_s: float) -> type[MetricsHandler]:
    """prometheus_client's handler for ``registry``, with a socket timeout (``setup`` applies
    ``timeout`` to the connection: an idle read then ends the connection)."""
    base: type[MetricsHandler] = MetricsHandler.factory(registry)
    return type("EmbedplexMetricsHandler", (base,), {"timeout": timeout_s})


class MetricsServer:
    """A running metrics server; ``stop()`` closes its socket."""

    def __init__(self, server: _BoundedServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(
        cls,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        timeout_s: float = TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> MetricsServer:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server = _BoundedServer(
            (host, port), _handler(registry, timeout_s), max_connections, family
        )
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
