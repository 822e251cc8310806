"""Connection limits (serve/edge.py) against a real uvicorn on 127.0.0.1, driven by raw sockets.

Each test starts its own small server with short limits, so that a limit is reached in well
under a second; the assertions only ask that it is reached within generous bounds.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

from embedplex.backends.fake import FakeBackend
from embedplex.observability.metrics import Metrics
from embedplex.serve.edge import EdgeLimits, edge_protocol, edge_stats
from helpers import fake_app, parse_metrics, value
from wire import edge_server, read_all, responses

WAIT_S = 15.0  # how long a test waits for a limit to act (a loaded box is slow)


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body and answers it back, with the path in a header."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(b"content-length", str(len(body)).encode()), (b"x-path", scope["path"].encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def server(app: Any, limits: EdgeLimits) -> Iterator[int]:
    """``app`` under uvicorn with ``limits``, its lifespan run; yields the port once it listens."""
    with edge_server(app, limits, lifespan="on") as port:
        yield port


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    s.settimeout(WAIT_S)
    return s


def get(path: str = "/x", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: t\r\n{extra}\r\n".encode()


def test_pipelined_requests_are_answered_in_order() -> None:
    with server(echo, EdgeLimits()) as port, connect(port) as s:
        post = b"POST /second HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello"
        s.sendall(get("/first") + post + get("/third", "connection: close\r\n"))
        got = responses(read_all(s))
    assert [(status, h["x-path"], body) for status, h, body in got] == [
        (200, "/first", b""),
        (200, "/second", b"hello"),
        (200, "/third", b""),
    ]


def test_headers_over_the_cap_get_431_json_and_the_connection_closes() -> None:
    limits = EdgeLimits(max_header_bytes=2048)
    with server(echo, limits) as port:
        with connect(port) as s:  # many small headers
            s.sendall(get(extra="".join(f"x-h{k}: {'v' * 50}\r\n" for k in range(60))))
            ((status, headers, body),) = responses(read_all(s))
        assert status == 431
        assert headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        assert orjson.loads(body)["error"].startswith("request line and headers exceed 2048")
        with connect(port) as s:  # one huge header value that never ends
            s.sendall(b"GET / HTTP/1.1\r\nhost: t\r\nx-big: ")
            try:
                for _ in range(64):
                    s.sendall(b"v" * 1024)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused while still sending: the answer may be lost, the close is not
            data = read_all(s)
            assert not data or responses(data)[0][0] == 431
        with connect(port) as s:  # a long URL counts too
            s.sendall(get("/" + "a" * 4096))
            assert responses(read_all(s))[0][0] == 431
        with connect(port) as s:  # under the cap: served
            s.sendall(get("/ok", "x-h: " + "v" * 1500 + "\r\nconnection: close\r\n"))
            assert responses(read_all(s))[0][0] == 200


def test_slow_headers_get_408_and_the_connection_closes() -> None:
    limits = EdgeLimits(header_timeout_s=0.5)
    with server(echo, limits) as port, connect(port) as s:
        start = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\n")
        data = b""
        for k in range(200):  # a slowloris: a header byte every 50 ms, never done
            try:
                s.sendall(b"x-slow-%d: 1\r\n" % k)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)
            s.setblocking(False)
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            finally:
                s.setblocking(True)
            break
        data += read_all(s)
        elapsed = time.monotonic() - start
    assert elapsed < WAIT_S  # cut off, although it kept sending
    status, headers, body = responses(data)[0]
    assert status == 408
    assert headers["connection"] == "close"
    assert "headers not received within 0.5 s" in orjson.loads(body)["error"]


def test_refusals_of_an_openai_route_come_in_its_shape() -> None:
    """431, the 408 for slow headers and the 400 for a request HTTP cannot parse name the
    path their request line gave, so an OpenAI route's caller gets OpenAI's error shape."""
    limits = EdgeLimits(max_header_bytes=1024, header_timeout_s=0.5)
    head = b"POST /v1/embeddings?x=1 HTTP/1.1\r\nhost: t\r\n"
    with server(echo, limits) as port:
        with connect(port) as s:
            s.sendall(head + b"x-big: " + b"v" * 2000 + b"\r\n\r\n")
            big = responses(read_all(s))[0]
        with connect(port) as s:
            s.sendall(head)  # and nothing more
            slow = responses(read_all(s))[0]
        with connect(port) as s:
            s.sendall(head + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n")
            bad = responses(read_all(s))[0]
        with connect(port) as s:
            s.sendall(b"POST /embed HTTP/1.1\r\nhost: t\r\nx-big: " + b"v" * 2000 + b"\r\n\r\n")
            tei = responses(read_all(s))[0]
    codes = [(status, orjson.loads(body)["error"]["code"]) for status, _, body in (big, slow, bad)]
    assert codes == [(431, "headers_too_large"), (408, "timeout"), (400, "invalid_request")]
    assert tei[0] == 431 and orjson.loads(tei[2])["error_type"] == "Validation"


def test_idle_connections_are_closed_before_the_first_request_and_between_requests() -> None:
    limits = EdgeLimits(idle_timeout_s=0.5)
    with server(echo, limits) as port:
        with connect(port) as s:  # never sends a byte
            start = time.monotonic()
            assert read_all(s) == b""
            assert time.monotonic() - start < WAIT_S
        with connect(port) as s:  # one request, then silence on the kept-alive connection
            s.sendall(get())
            data = read_all(s)
            assert [r[0] for r in responses(data)] == [200]
        with connect(port) as s:  # a trickle of blank lines is no request: still idle
            start = time.monotonic()
            try:
                while time.monotonic() - start < WAIT_S:
                    s.sendall(b"\r\n")
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert time.monotonic() - start < WAIT_S


def test_a_connection_in_use_outlives_its_first_keep_alive_deadline() -> None:
    """The keep-alive timer is kept lazily (serve/http_protocol.py): the check armed after the
    first answer fires while later requests keep the connection busy, and must let it be; the
    connection still closes once it is idle for the bound."""
    limits = EdgeLimits(idle_timeout_s=0.6)
    with server(echo, limits) as port, connect(port) as s:
        start = time.monotonic()
        answered = 0
        while time.monotonic() - start < 2.0:  # past three deadlines, one request at a time
            s.sendall(get())
            reply = b""
            while not reply.endswith(b"\r\n\r\n"):  # echo: an empty body after the head
                chunk = s.recv(65536)
                assert chunk, f"closed after {answered} answers, while in use"
                reply += chunk
            answered += 1
            time.sleep(0.2)
        idle_from = time.monotonic()
        assert read_all(s) == b""
        assert 0.3 < time.monotonic() - idle_from < WAIT_S


def test_a_slow_body_gets_408_and_the_app_stops_waiting() -> None:
    limits = EdgeLimits(body_timeout_s=0.5)
    with server(echo, limits) as port, connect(port) as s:
        s.sendall(b"POST /slow HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n")
        start = time.monotonic()
        try:
            for _ in range(200):  # one byte every 50 ms: 1000 bytes would take 50 s
                s.sendall(b"x")
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(WAIT_S)
        data = read_all(s)
        assert time.monotonic() - start < WAIT_S
    status, _, body = responses(data)[0]
    assert status == 408
    assert orjson.loads(body)["error"] == "request body not received within 0.5 s"


def test_connections_over_the_cap_get_503_json_and_are_closed() -> None:
    limits = EdgeLimits(max_connections=3)
    with server(echo, limits) as port:
        held = [connect(port) for _ in range(3)]
        try:
            for s in held:  # each is served (and kept alive)
                s.sendall(get())
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
            with connect(port) as extra:
                status, headers, body = responses(read_all(extra))[0]
            assert status == 503
            assert headers["connection"] == "close"
            assert headers["retry-after"] == "1"
            assert "too many open connections" in orjson.loads(body)["error"]
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + WAIT_S
        while True:  # once they have gone, a new connection is served again
            with connect(port) as s:
                s.sendall(get(extra="connection: close\r\n"))
                if responses(read_all(s))[0][0] == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_malformed_requests_get_a_json_400_and_refusals_are_counted() -> None:
    metrics = Metrics()
    metrics.watch_edge(edge_stats)
    before = parse_metrics(metrics.render().decode())
    with server(echo, EdgeLimits(max_header_bytes=1024)) as port:
        with connect(port) as s:
            s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            status, headers, body = responses(read_all(s))[0]
        with connect(port) as s:
            s.sendall(get(extra="x-big: " + "v" * 2000 + "\r\n"))
            assert responses(read_all(s))[0][0] == 431
        with connect(port) as s:  # held open while the metrics are read
            s.sendall(get())
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            after = parse_metrics(metrics.render().decode())
            assert value(after, "embedplex_connections_open") >= 1
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"].startswith("invalid HTTP request")
    name = "embedplex_connection_refusals_total"
    for reason in ("bad_request", "headers_too_large"):
        assert value(after, name, reason=reason) == value(before, name, reason=reason) + 1
    assert value(after, name, reason="body_timeout") == value(before, name, reason="body_timeout")


def ready(port: int) -> str:
    """The base URL of the app served on ``port``, once its models have loaded."""
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while httpx.get(base + "/health/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return base


def test_an_unauthenticated_huge_body_is_refused_unread(tiny_model_dir: Path) -> None:
    """401 from the headers alone: the server neither reads nor waits for the body, and
    closes the connection rather than read the rest of it."""
    app = fake_app(tiny_model_dir, FakeBackend(), api_key="sk-edge-test")
    with server(app, EdgeLimits()) as port:
        ready(port)
        # Over the body limit and under it; a JSON route the pipeline serves, and one FastAPI
        # answers (the stages run before either reads a byte of the body).
        for length, path in [(10**9, b"/embed"), (10**5, b"/embed"), (10**9, b"/info")]:
            with connect(port) as s:
                s.sendall(
                    b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n" % (path, length)
                )
                s.sendall(b"x" * 1000)  # a first piece of a body that never comes in full
                data = read_all(s)  # the server closes: it does not wait for the rest
            status, headers, body = responses(data)[0]
            assert status == 401
            assert orjson.loads(body)["error_type"] == "Unauthorized"
            # Told so, since the connection closes: a client must not send its next request
            # into it ("server disconnected without a response").
            assert headers["connection"] == "close"
        # A whole request on a kept-alive connection is answered and the connection kept: two
        # answers on one connection, neither saying close.
        with connect(port) as s:
            s.sendall(
                b"POST /embed HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-edge-test\r\n"
                b"content-type: application/json\r\ncontent-length: 15\r\n\r\n"
                b'{"inputs": "x"}'
            )
            s.sendall(get("/health/live", "connection: close\r\n"))
            both = responses(read_all(s))
        assert [r[0] for r in both] == [200, 200]
        assert "connection" not in both[0][1]
        # An authenticated request over the body limit is 413 before its body is read.
        with connect(port) as s:
            s.sendall(
                b"POST /embed HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-edge-test\r\n"
                b"content-length: %d\r\n\r\n" % 10**9
            )
            assert responses(read_all(s))[0][0] == 413


def test_limits_are_settings_and_flags() -> None:
    from typer.testing import CliRunner

    from embedplex.cli.main import app as cli
    from embedplex.config import Settings

    flags = ["--http-max-connections", "7", "--http-header-timeout-s", "2.5"]
    shown = orjson.loads(CliRunner().invoke(cli, ["config", "show", *flags]).stdout)
    assert (shown["http_max_connections"], shown["http_header_timeout_s"]) == (7, 2.5)
    limits = EdgeLimits.from_settings(Settings(http_max_connections=7, http_body_timeout_s=3))
    assert (limits.max_connections, limits.body_timeout_s) == (7, 3.0)
    assert EdgeLimits.from_settings(Settings()) == EdgeLimits()  # the documented defaults
    assert edge_protocol(limits).limits is limits


def test_json_routes_carry_cors_headers_on_a_real_connection(tiny_model_dir: Path) -> None:
    """The connection's one-write JSON answers bypass ``send``, where CORS adds its headers:
    under a CORS policy every answer still carries them (the in-process tests have no
    connection, so only a real server shows it)."""
    origin = {"origin": "https://a.example"}
    app = fake_app(
        tiny_model_dir, FakeBackend(), api_key="sk-edge-test", cors_allow_origins=[origin["origin"]]
    )
    # As ``embedplex serve`` runs it: no uvicorn access log (with one, no answer is one write).
    with edge_server(app, EdgeLimits(), lifespan="on", access_log=False) as port:
        base = ready(port)
        key = {"authorization": "Bearer sk-edge-test"}
        with httpx.Client(base_url=base, timeout=30) as client:
            answers = [
                client.post("/v1/embeddings", json={"input": "x"}, headers=origin),
                client.post("/v1/embeddings", json={"input": "x"}, headers={**origin, **key}),
                client.post("/embed", json={"inputs": "x"}, headers={**origin, **key}),
                client.get("/info", headers={**origin, **key}),
            ]
    assert [r.status_code for r in answers] == [401, 200, 200, 200]
    for r in answers:
        assert r.headers["access-control-allow-origin"] == origin["origin"]


def test_head_is_answered_on_every_get_route_on_a_real_connection(tiny_model_dir: Path) -> None:
    """As TEI and Starlette's own routes do (load balancers probe with HEAD): the GET answer's
    status and headers, no body; the connection stays usable. A POST-only path is a 405."""
    app = fake_app(tiny_model_dir, FakeBackend())
    with edge_server(app, EdgeLimits(), lifespan="on", access_log=False) as port:
        base = ready(port)
        with httpx.Client(base_url=base, timeout=30) as client:
            for path in ("/health", "/health/live", "/health/ready", "/info", "/v1/models"):
                get = client.get(path)
                head = client.head(path)
                assert (head.status_code, get.status_code) == (200, 200), path
                assert head.content == b"", path
                assert head.headers["content-length"] == str(len(get.content)), path
                assert head.headers.get("content-type") == get.headers.get("content-type"), path
            post_only = client.head("/embed")
            after = client.get("/health/live")  # the same connection, still in step
    assert post_only.status_code == 405 and post_only.headers["allow"] == "POST"
    assert after.status_code == 200 and after.json() == {"status": "alive"}
