"""One write per small response: the head waits for its body, never longer than a loop turn."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn

from embedplex.serve.http_protocol import CoalescingTransport, OneWriteHttpToolsProtocol


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.writes.append(b"".join(chunks))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


async def test_head_and_body_go_out_in_one_write() -> None:
    inner = RecordingTransport()
    t = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(HEAD)
    assert inner.writes == []
    t.write(b"ok")
    assert inner.writes == [HEAD + b"ok"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing held
    assert inner.writes == [HEAD + b"ok"]


async def test_a_lone_head_is_flushed_on_the_next_loop_turn_and_on_close() -> None:
    inner = RecordingTransport()
    t = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(HEAD)
    await asyncio.sleep(0)
    assert inner.writes == [HEAD]
    t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    t.close()
    assert inner.writes == [HEAD, b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert inner.closed
    # Body chunks and anything else pass straight through; other attributes are forwarded.
    t.write(b"chunk")
    assert inner.writes[-1] == b"chunk"
    assert t.get_extra_info("peername") == "info:peername"


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def test_real_server_keep_alive_and_streaming() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        _app, host="127.0.0.1", port=port, http=OneWriteHttpToolsProtocol, log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for k in range(20):  # one keep-alive connection, many responses
                r = client.post("/echo", content=b"x" * k)
                assert r.status_code == 200
                assert r.content == b"x" * k
            r = client.post("/stream", content=b"")
            assert r.content == b"abc"
            assert r.headers["transfer-encoding"] == "chunked"
    finally:
        server.should_exit = True
        thread.join(10)
