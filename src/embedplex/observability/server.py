"""``--metrics-port``: ``/metrics`` on a port of its own, served from a daemon thread.

A separate port lets operators keep metrics off the public API port (and out of its auth) and
keeps scrapes answering while the event loop is busy.

Not ``prometheus_client.start_http_server``: that one starts a thread per connection with no
read timeout and no cap, so idle connections (a port scan, a slow client) pile up threads and
file descriptors until the API port and the probes starve. Here a connection lives at most
``timeout_s`` in all (a scrape is one HTTP/1.0 request, answered in milliseconds), and past
``max_connections`` at once the oldest open connection is cut for the new one: a few slow or
idle clients can neither pile up threads nor keep a scraper out (refusing the new connection
instead let 32 clients sending a byte now and then fail every scrape).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

logger = logging.getLogger(__name__)

# A scrape is one short request; 10 s is far past any real one and bounds an idle connection.
TIMEOUT_S = 10.0
# Connections served at once: a few scrapers, with room to spare.
MAX_CONNECTIONS = 32
METRICS_PATH = "/metrics"  # the one path answered (any query: prometheus_client's ``name[]``)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, each cut off after ``deadline_s``; at most ``max_connections``
    open, the oldest cut for a new one past that."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[Any],
        max_connections: int,
        family: int,
        deadline_s: float,
    ) -> None:
        self.address_family = family
        self.max_connections = max_connections
        self.deadline_s = deadline_s
        self._lock = threading.Lock()
        self._open: dict[socket.socket, None] = {}  # in the order they came
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._open) >= self.max_connections:
                oldest = next(iter(self._open))
                del self._open[oldest]
                _cut_off(oldest)  # its thread's next read ends: the thread goes
            self._open[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # One deadline for the connection, not per read (``timeout`` restarts with each byte).
        cut = threading.Timer(self.deadline_s, _cut_off, (request,))
        cut.daemon = True
        cut.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            cut.cancel()
            self._forget(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed, through the log, not socketserver's traceback on stderr
        (lines that are not the log's format, JSON included). A peer gone or cut off (a scan,
        a client that left, ``_cut_off``) is routine: debug. Anything else is a fault: error."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            logger.debug("metrics connection ended: %s", type(error).__name__)
        else:
            logger.error("metrics request failed", exc_info=True)

    def _forget(self, request: socket.socket) -> None:
        with self._lock:
            self._open.pop(request, None)


def _cut_off(conn: socket.socket) -> None:
    """End a connection from another thread: a blocked read returns, the handler ends."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def _handler(registry: CollectorRegistry, timeout_s: float) -> type[MetricsHandler]:
    """prometheus_client's handler for ``registry``, with a socket timeout (``setup`` applies
    ``timeout`` to the connection: an idle read then ends the connection), answering
    ``/metrics`` only."""
    base: type[MetricsHandler] = MetricsHandler.factory(registry)

    def do_GET(self: MetricsHandler) -> None:
        # prometheus_client's handler answers every path with the metrics (``/``,
        # ``/favicon.ico``, ``/health``): a probe or a scrape job pointed at the wrong path
        # would pass. The API port's ``/metrics`` is an exact path too.
        if urlsplit(self.path).path != METRICS_PATH:
            self.send_error(404, "not found: this port serves /metrics only")
            return
        base.do_GET(self)

    return type("EmbedplexMetricsHandler", (base,), {"timeout": timeout_s, "do_GET": do_GET})


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
            (host, port), _handler(registry, timeout_s), max_connections, family, timeout_s
        )
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        """``host:port`` as bound (an IPv6 host in brackets)."""
        host = str(self._server.server_address[0])
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
