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


def test_connections_over_the_cap_are_refused_and_metrics_still_answer(
    server: MetricsServer,
) -> None:
    threads_before = threading.active_count()
    held = [_idle(server.port) for _ in range(2)]
    time.sleep(0.2)  # both accepted and holding a slot
    extra = [_idle(server.port) for _ in range(5)]
    for conn in extra:
        assert _closed_within(conn, 0.5)  # refused at once, long before the 1 s timeout
    assert threading.active_count() <= threads_before + 2
    for conn in held:
        assert _closed_within(conn, 3.0)  # the timeout frees the slots
    answer = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert answer.status_code == 200 and "probe_total 1.0" in answer.text
    for conn in held + extra:
        conn.close()
