"""Hostile clients at the process level: sockets held open, oversized headers, bad secrets.

Each case is what an attacker (or a careless operator) does to a real server process over TCP.
Each failed on the code before the hardening of issue 14 and passes now.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from procs import Server, fake_server

# Generous: the edge's defaults are seconds; a loaded CI box adds a little.
CLOSE_BOUND_S = 20.0


@pytest.fixture(scope="module")
def open_server(tiny_model_dir: Path) -> Iterator[Server]:
    # Short connection timeouts, so that the cases that wait for them stay CI-sized.
    with fake_server(tiny_model_dir, http_idle_timeout_s=3, http_header_timeout_s=3) as srv:
        yield srv


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            # An answer (a 408 or 431) is fine too: then the close must follow.
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def test_an_idle_socket_is_closed(open_server: Server) -> None:
    """A client that connects and never sends a byte does not hold the connection."""
    with _connect(open_server) as sock:
        assert _closed_within(sock, CLOSE_BOUND_S)


def test_slow_headers_are_cut_off(open_server: Server) -> None:
    """Slowloris: a header line every second never completes a request; the server hangs up."""
    with _connect(open_server) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + CLOSE_BOUND_S
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            closed = _closed_within(sock, 1.0)
        assert closed


def test_huge_headers_get_431(open_server: Server) -> None:
    r = httpx.get(open_server.url + "/health/live", headers={"X-Big": "a" * 128 * 1024})
    assert r.status_code == 431


def test_idle_connections_do_not_deny_service(open_server: Server) -> None:
    """Holding many sockets open (today without limit) must not stop others being served."""
    socks = [_connect(open_server) for _ in range(200)]
    try:
        start = time.monotonic()
        r = httpx.post(open_server.url + "/embed", json={"inputs": "still served"}, timeout=30)
        assert r.status_code == 200 and time.monotonic() - start < 5.0
    finally:
        for s in socks:
            s.close()


def test_a_body_larger_than_the_limit_is_413_before_it_is_read(open_server: Server) -> None:
    """A Content-Length past the limit is refused at once, without reading the body."""
    with _connect(open_server) as sock:
        sock.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        sock.settimeout(10)
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:100]


# -- secrets ---------------------------------------------------------------------------------


def _start_outcome(tiny_model_dir: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """Start a server with ``env``; its exit code (None: it started and served) and output."""
    with fake_server(tiny_model_dir, env=env, ready=False) as srv:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            code = srv.proc.poll()
            if code is not None:
                return code, srv.output()
            try:
                if httpx.get(srv.url + "/health/live", timeout=1).status_code == 200:
                    return None, srv.output()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise AssertionError("neither exited nor served in 60 s")


def test_an_empty_api_key_is_refused_at_start(tiny_model_dir: Path) -> None:
    code, out = _start_outcome(tiny_model_dir, {"EMBEDPLEX_API_KEY": ""})
    assert code not in (None, 0) and "api_key" in out


@pytest.mark.parametrize(
    "env",
    [{"EMBEDPLEX_API_KEY": "   "}, {"EMBEDPLEX_ADMIN_SECRET": ""}, {"EMBEDPLEX_ADMIN_SECRET": " "}],
    ids=["blank-api-key", "empty-admin-secret", "blank-admin-secret"],
)
def test_an_empty_or_blank_secret_is_refused_at_start(
    tiny_model_dir: Path, env: dict[str, str]
) -> None:
    code, out = _start_outcome(tiny_model_dir, env)
    assert code not in (None, 0), out[-2000:]


API_KEY = "hostile-api-key"
ADMIN_SECRET = "hostile-admin-secret"


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path) -> Iterator[Server]:
    env = {"EMBEDPLEX_API_KEY": API_KEY, "EMBEDPLEX_ADMIN_SECRET": ADMIN_SECRET}
    with fake_server(tiny_model_dir, env=env) as srv:
        yield srv


def _admin_add(srv: Server, provider: dict[str, object], secret: str) -> httpx.Response:
    return httpx.post(
        srv.url + "/api/v1/providers",
        json={"provider": provider},
        headers={"X-Admin-Secret": secret},
        timeout=30,
    )


def test_wrong_or_missing_secrets_are_401(keyed_server: Server) -> None:
    url = keyed_server.url
    assert httpx.post(url + "/embed", json={"inputs": "x"}).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.post(url + "/embed", json={"inputs": "x"}, headers=bad).status_code == 401
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(url + "/embed", json={"inputs": "x"}, headers=good).status_code == 200
    r = _admin_add(keyed_server, {"name": "p", "type": "tei", "endpoint": "http://x"}, "wrong")
    assert r.status_code == 401 and ADMIN_SECRET not in r.text


@pytest.mark.parametrize(
    "endpoint",
    ["http://169.254.169.254/latest", "http://127.0.0.1:1", "http://10.0.0.1", "http://[::1]:1"],
    ids=["metadata", "loopback", "private", "loopback-v6"],
)
def test_a_provider_endpoint_in_a_private_range_is_refused(
    keyed_server: Server, endpoint: str
) -> None:
    provider = {"name": "evil", "type": "openai", "endpoint": endpoint, "model": "m"}
    r = _admin_add(keyed_server, provider, ADMIN_SECRET)
    httpx.delete(
        keyed_server.url + "/api/v1/providers/evil", headers={"X-Admin-Secret": ADMIN_SECRET}
    )
    assert r.status_code == 422


def test_a_provider_key_env_not_listed_by_the_operator_is_refused(keyed_server: Server) -> None:
    """An admin client cannot have the server send any of its environment to an endpoint."""
    provider = {
        "name": "leak",
        "type": "openai",
        "endpoint": "https://example.invalid",
        "model": "m",
        "api_key_env": "EMBEDPLEX_API_KEY",
    }
    r = _admin_add(keyed_server, provider, ADMIN_SECRET)
    httpx.delete(
        keyed_server.url + "/api/v1/providers/leak", headers={"X-Admin-Secret": ADMIN_SECRET}
    )
    assert r.status_code == 422


def test_metrics_follow_the_api_key(keyed_server: Server) -> None:
    assert httpx.get(keyed_server.url + "/metrics").status_code == 401


def test_the_data_plane_key_is_not_an_admin_secret(tiny_model_dir: Path) -> None:
    with fake_server(tiny_model_dir, env={"EMBEDPLEX_API_KEY": API_KEY}) as srv:
        provider = {"name": "p", "type": "openai", "endpoint": "https://example.invalid"}
        r = _admin_add(srv, {**provider, "model": "m"}, API_KEY)
    assert r.status_code in (401, 403, 404)
