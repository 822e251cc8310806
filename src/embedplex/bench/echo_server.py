"""A trivial HTTP server that answers every request with one fixed embedding response.

It does no work at all, so a load run against it shows what the load generator itself can
drive on this machine: the ceiling above which its numbers would measure the client, not the
server. Run as ``python -m embedplex.bench.echo_server PORT``.
"""

from __future__ import annotations

import asyncio
import sys

import orjson

from embedplex.bench.stub_http import StubProtocol, serve_stub

_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0] * 384}],
        "model": "echo",
        "usage": {"prompt_tokens": 14, "total_tokens": 14},
    }
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    + f"content-length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


class _EchoProtocol(StubProtocol):
    def on_message_complete(self) -> None:
        self.reply(RESPONSE)


async def serve(port: int) -> None:
    await serve_stub(_EchoProtocol, port)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
