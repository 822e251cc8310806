"""The bench's stand-in servers (``embedplex.bench.echo_server``, ``fake_upstream``), run by
their command lines as the bench suite and examples/router_cpu*.py run them: pipelined
requests get one whole answer each, in order, and bytes that are not HTTP close the
connection."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import orjson

from helpers import free_port
from wire import read_all, responses

WAIT_S = 15.0


@contextmanager
def stub(module: str, *args: str) -> Iterator[int]:
    """``python -m embedplex.bench.<module> PORT *args``; yields the port once it accepts."""
    port = free_port()
    cmd = [sys.executable, "-m", f"embedplex.bench.{module}", str(port), *args]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"{module} exited with {proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{module} never listened"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def exchange(port: int, data: bytes, *, done: bool = True) -> bytes:
    """Send ``data`` and read until the server closes; ``done``: then say no more is coming
    (without it, only the server's own close ends the read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        s.settimeout(WAIT_S)
        s.sendall(data)
        if done:
            s.shutdown(socket.SHUT_WR)
        return read_all(s)


def post(body: bytes) -> bytes:
    head = b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def test_the_fake_upstream_answers_one_vector_per_input_in_the_asked_format() -> None:
    with stub("fake_upstream", "16") as port:
        got = responses(
            exchange(
                port,
                post(b'{"input": ["a", "b", "c"], "model": "m", "encoding_format": "base64"}')
                + post(b'{"input": "one", "model": "m"}')
                + post(b"{not json")  # answered as one input, in floats
                + b"GET / HTTP/1.1\r\nhost: t\r\n\r\n",  # no body: the same
            )
        )
        assert exchange(port, b"NOT HTTP\r\n\r\n" + post(b'{"input": "x"}'), done=False) == b""
    assert [status for status, _, _ in got] == [200, 200, 200, 200]
    assert all(h["content-type"] == "application/json" for _, h, _ in got)
    bodies = [orjson.loads(body) for _, _, body in got]
    assert [len(b["data"]) for b in bodies] == [3, 1, 1, 1]
    assert [d["index"] for d in bodies[0]["data"]] == [0, 1, 2]
    assert bodies[0]["usage"] == {"prompt_tokens": 24, "total_tokens": 24}
    packed = np.frombuffer(base64.b64decode(bodies[0]["data"][0]["embedding"]), dtype="<f4")
    floats = np.array(bodies[1]["data"][0]["embedding"], dtype=np.float32)
    assert packed.shape == floats.shape == (16,)
    np.testing.assert_allclose(packed, floats)  # the same unit vector, either way
    assert abs(float(np.linalg.norm(floats)) - 1.0) < 1e-5
    assert bodies[2] == bodies[3] == bodies[1]


def test_the_echo_server_answers_every_request_with_its_one_response() -> None:
    from embedplex.bench.echo_server import RESPONSE

    with stub("echo_server") as port:
        data = exchange(port, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n" + post(b'{"input": "x"}') * 2)
        assert exchange(port, b"NOT HTTP\r\n\r\n", done=False) == b""
    assert data == RESPONSE * 3
    ((status, _, body),) = responses(RESPONSE)
    assert status == 200
    assert len(orjson.loads(body)["data"][0]["embedding"]) == 384
