"""The --metrics-port server bounds idle and excess connections (ops review: one thread per
connection, no read timeout, no cap: 1000 idle connections were 1000 threads and starved
the API port)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from embedplex.observability.server import MetricsServer


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    registry = CollectorRegistry()
    Counter("probe_total", "a counter", registry=registry).inc()
    try:
        started = MetricsServer.start(registry, "127.0.0.1", 0, timeout_s=1.0, max_connections=2)
    except TypeError:  # the old server takes neither bound
        pytest.fail("MetricsServer.start has no connection timeout or cap")
    yield started
    started.stop()


def _idle(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    return conn


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    """True when the server closes ``conn`` (EOF or reset) within ``seconds``."""
    conn.settimeout(seconds)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_an_idle_connection_is_closed_after_the_timeout(server: MetricsServer) -> None:
    conn = _idle(server.port)
    start = time.monotonic()
    assert _closed_within(conn, 5.0)
    assert 0.8 <= time.monotonic() - start < 3.0
    conn.close()


def test_a_connection_that_trickles_is_cut_at_the_deadline(server: MetricsServer) -> None:
    """The timeout is for the whole connection: a byte every 0.3 s (each read well inside a
    1 s read timeout) kept its slot for ever."""
    conn = _idle(server.port)
    start = time.monotonic()
    closed = False
    for _ in range(20):
        try:
            conn.sendall(b"G")
        except OSError:
            closed = True
            break
        if _closed_within(conn, 0.3):
            closed = True
            break
    assert closed and time.monotonic() - start < 2.5
    conn.close()


def test_past_the_cap_the_oldest_connection_is_cut_and_scrapes_are_answered(
    server: MetricsServer,
) -> None:
    """Slow or idle clients holding every slot cannot keep a scraper out (refusing the new
    connection did: 32 clients sending a byte now and then failed every scrape)."""
    threads_before = threading.active_count()
    held = [_idle(server.port) for _ in range(2)]
    time.sleep(0.2)  # both accepted and holding a slot
    for _ in range(3):
        answer = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        assert answer.status_code == 200 and "probe_total 1.0" in answer.text
    assert _closed_within(held[0], 0.5)  # cut for the first scrape, long before its deadline
    assert _closed_within(held[1], 3.0)  # the next found a free slot; its deadline cuts it
    time.sleep(0.2)
    assert threading.active_count() <= threads_before + 2
    for conn in held:
        conn.close()


def test_a_client_that_leaves_writes_no_traceback_to_stderr(
    server: MetricsServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """A malformed request whose client is gone before the 400 is written raised
    BrokenPipeError in the handler, and socketserver printed its traceback on stderr: lines
    outside the log's format (JSON logs included), for every port scan. It is a debug line."""
    for _ in range(20):
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.sendall(b"BAD REQUEST LINE WITH TOO MANY PARTS HTTP/1.1\r\n\r\n")
        conn.close()  # linger 0: a reset, so the server's answer meets a closed peer
    time.sleep(0.5)
    scrape = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert scrape.status_code == 200  # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_only_the_metrics_path_is_answered(server: MetricsServer) -> None:
    """prometheus_client's handler answered every path with the metrics (``/``, ``/health``,
    ``/favicon.ico``): a probe or a scrape job pointed at the wrong path passed."""
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/metrics", "/metrics?name[]=probe_total"):
        answer = httpx.get(base + path, timeout=5)
        assert answer.status_code == 200 and "probe_total 1.0" in answer.text, path
    for path in ("/", "/health", "/favicon.ico", "/metricsfoo", "/metrics/"):
        answer = httpx.get(base + path, timeout=5)
        assert answer.status_code == 404 and "probe_total" not in answer.text, path
