"""A fake OpenAI-compatible upstream that answers every ``/v1/embeddings`` call at once.

It answers one fixed vector per input (base64 float32 when the call asks for ``base64``, as
the router's ``openai`` adapter does, else a list of floats), so a router in front of it batches
and splits for real while the upstream costs next to nothing: a load run through such a router
measures the router's own CPU per routed request. Run as
``python -m embedplex.bench.fake_upstream PORT [DIM]``; see docs/router.md ("Router CPU").
"""

from __future__ import annotations

import asyncio
import base64
import sys

import numpy as np
import orjson

from embedplex.bench.stub_http import StubProtocol, serve_stub


class _Answers:
    """The response bytes for a call of ``n`` inputs, built once per ``n`` and format."""

    def __init__(self, dim: int) -> None:
        vector = np.linspace(-1.0, 1.0, dim, dtype=np.float32)
        vector /= np.linalg.norm(vector)
        self._b64 = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        self._floats = [float(x) for x in vector]
        self._cache: dict[tuple[int, bool], bytes] = {}

    def get(self, n: int, b64: bool) -> bytes:
        key = (n, b64)
        cached = self._cache.get(key)
        if cached is None:
            embedding = self._b64 if b64 else self._floats
            body = orjson.dumps(
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": embedding}
                        for i in range(n)
                    ],
                    "model": "fake",
                    "usage": {"prompt_tokens": 8 * n, "total_tokens": 8 * n},
                }
            )
            cached = self._cache[key] = (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
        return cached


class _Protocol(StubProtocol):
    def __init__(self, answers: _Answers) -> None:
        super().__init__()
        self._answers = answers
        self._body: list[bytes] = []

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        raw, self._body = b"".join(self._body), []
        try:
            request = orjson.loads(raw)
            inputs = request["input"]
            n = 1 if isinstance(inputs, str) else len(inputs)
            b64 = request.get("encoding_format") == "base64"
        except (orjson.JSONDecodeError, KeyError, TypeError):
            n, b64 = 1, False
        self.reply(self._answers.get(n, b64))


async def serve(port: int, dim: int = 384) -> None:
    answers = _Answers(dim)
    await serve_stub(lambda: _Protocol(answers), port)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 384))
