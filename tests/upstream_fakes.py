"""A fake upstream embedding server on 127.0.0.1 speaking the OpenAI, Voyage, Cohere and TEI APIs.

Each API's rerank endpoint is there too (TEI ``/rerank``, Cohere ``/v2/rerank``, Voyage
``/voyage/v1/rerank``, Jina-style ``/v1/rerank``), answering in the vendor's documented shape:
results sorted best first, cut to ``top_n``/``top_k``, so the adapters must put them back in
document order. Scores come from ``score_for`` (a function of the query and the document only).

It runs under uvicorn in a background thread (a real HTTP server, so retries, timeouts, resets
and connection pooling are exercised for real). Faults are queued per call: ``script(...)``
pushes what the next calls do (status codes with Retry-After, a delay, a reset connection, a
malformed body); once the script is empty, calls succeed after ``delay`` seconds. Every call is
recorded with its route and body, so tests can count upstream calls and check batch grouping.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from embedplex.providers.config import ProviderConfig

DIM = 8


def vector_for(text: str, dim: int = DIM) -> np.ndarray:
    """The fake model: a unit vector that depends only on the text."""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    v = rng.standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def score_for(query: str, document: str) -> float:
    """The fake reranker: a relevance in (0, 1) that depends only on the pair."""
    return (zlib.crc32(f"{query}\x00{document}".encode()) % 9973 + 1) / 9975


def logit_for(query: str, document: str) -> float:
    """TEI's ``raw_scores``: the logit whose sigmoid is ``score_for``."""
    p = score_for(query, document)
    return float(np.log(p / (1 - p)))


@dataclass
class Fault:
    """What one call does instead of succeeding (``status`` 0: succeed after ``delay``)."""

    status: int = 0
    retry_after: str | None = None
    delay: float = 0.0
    reset: bool = False
    malformed: bool = False
    # A hostile or careless upstream: its error message repeats the request's headers (the
    # API key among them), with terminal escapes, newlines and a lot of padding.
    echo_headers: bool = False
    # A 200 whose OpenAI ``data`` is wrong: "dup_index" (indexes 0, 0, 2...), "out_of_range"
    # (indexes from 5), "ragged" (the first row shorter than the rest).
    bad_rows: str = ""
    # A 200 whose body trickles in, one byte every ``drip`` seconds (0: off).
    drip: float = 0.0


@dataclass
class Call:
    path: str
    body: dict[str, Any]
    texts: list[str]
    at: float = field(default_factory=time.monotonic)
    headers: dict[str, str] = field(default_factory=dict)
    bad_rows: str = ""  # the fault's ``bad_rows``, applied by the API's answer


class ThreadServer:
    """Any ASGI app under uvicorn in a daemon thread, on a free port of 127.0.0.1."""

    def __init__(self, app: Any, *, lifespan: str = "off", port: int = 0) -> None:
        self.app = app
        self.lifespan = lifespan
        self.port = port  # 0: a free one
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="error", lifespan=self.lifespan, access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


class FakeUpstream:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.delay = 0.0
        self.max_texts: int | None = None  # answer 413 above this many texts
        # Refuse a call holding a text longer than this, as each API does: TEI 422
        # ("Input validation error"), the others 400 ("maximum context length").
        self.max_chars: int | None = None
        self.ignore_dimensions = False  # answer full-width vectors whatever was asked
        # TEI's own refusal above ``max_texts`` (422 "batch size N > maximum allowed batch
        # size M", as TEI answers since 2026-02) instead of the generic 413.
        self.tei_refusal = False
        # The status of TEI's validation errors (an input over its length, a batch over its
        # limit): 422 since 2026-02, 413 before.
        self.tei_validation_status = 422
        self.info_status = 200  # what GET /info answers (not 200: an /info that cannot be read)
        self.model_id = "fake"  # what /info says it serves
        self.info_paths: list[str] = []  # the /info paths read, in order
        # Refuse a call whose texts hold more tokens than this, as Voyage and OpenAI do (400,
        # their own words); a "token" here is ``FAKE_BYTES_PER_TOKEN`` bytes of UTF-8.
        self.max_batch_tokens: int | None = None
        self.rerank_counts = True  # False: TEI's rerank answers lack x-compute-tokens (a proxy)
        self.embed_counts = True  # False: OpenAI-style answers without usage (some servers)
        self._script: deque[Fault] = deque()
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/v1/embeddings", self._openai, methods=["POST"]),
                Route("/voyage/v1/embeddings", self._voyage, methods=["POST"]),
                Route("/v2/embed", self._cohere, methods=["POST"]),
                Route("/v1/embed", self._cohere, methods=["POST"]),
                Route("/embed", self._tei, methods=["POST"]),
                Route("/info", self._info, methods=["GET"]),
                Route("/tei/embed", self._tei, methods=["POST"]),
                Route("/tei/info", self._info, methods=["GET"]),
                Route("/inference/v1/embeddings", self._openai, methods=["POST"]),
                Route("/rerank", self._tei_rerank, methods=["POST"]),
                Route("/v2/rerank", self._cohere_rerank, methods=["POST"]),
                Route("/voyage/v1/rerank", self._voyage_rerank, methods=["POST"]),
                Route("/v1/rerank", self._jina_rerank, methods=["POST"]),
            ]
        )
        self._server = ThreadServer(self.app)

    # -- control ---------------------------------------------------------------------------

    def script(self, *faults: Fault) -> None:
        with self._lock:
            self._script.extend(faults)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.calls.clear()
            self.delay = 0.0
            self.max_texts = None
            self.max_chars = None
            self.ignore_dimensions = False
            self.tei_refusal = False
            self.tei_validation_status = 422
            self.info_status = 200
            self.model_id = "fake"
            self.info_paths.clear()
            self.max_batch_tokens = None

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def restart(self) -> None:
        """Come back on the same port after ``stop`` (an upstream that was down, then up)."""
        self._server = ThreadServer(self.app, port=self.port)
        self._server.start()

    # -- the APIs --------------------------------------------------------------------------

    async def _serve(self, request: Request, texts_key: str) -> tuple[Response | None, Call]:
        body = orjson.loads(await request.body())
        texts = body[texts_key]
        call = Call(request.url.path, body, list(texts), headers=dict(request.headers))
        with self._lock:
            self.calls.append(call)
            fault = self._script.popleft() if self._script else Fault(delay=self.delay)
        call.bad_rows = fault.bad_rows
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.reset:
            return _ResetResponse(), call
        if fault.status:
            headers = {"retry-after": fault.retry_after} if fault.retry_after else {}
            message = f"injected {fault.status}"
            if fault.echo_headers:
                message = f"bad request\x1b[31m\r\n{dict(request.headers)}\n" + "x" * 5000
            return (
                Response(
                    orjson.dumps({"error": {"message": message}}),
                    status_code=fault.status,
                    headers=headers,
                ),
                call,
            )
        if self.max_texts is not None and len(texts) > self.max_texts:
            if self.tei_refusal:
                return _tei_refuse_size(
                    len(texts), self.max_texts, self.tei_validation_status
                ), call
            msg = {"error": f"batch size {len(texts)} > {self.max_texts}"}
            return Response(orjson.dumps(msg), status_code=413), call
        cap = self.max_batch_tokens
        if cap is not None and (sent := sum(fake_tokens(t) for t in texts)) > cap:
            return _refuse_tokens(request.url.path, body.get("model"), cap, sent), call
        if self.max_chars is not None and any(len(t) > self.max_chars for t in texts):
            return _refuse_long(request.url.path, self.max_chars, self.tei_validation_status), call
        if fault.malformed:
            return Response(b'{"data": "not a list"', status_code=200), call
        if fault.drip:
            return _drip(fault.drip), call
        return None, call

    async def _openai(self, request: Request) -> Response:
        early, call = await self._serve(request, "input")
        if early is not None:
            return early
        as_b64 = call.body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(call.texts):
            v = self._vec(text, call.body.get("dimensions"))
            emb: Any = (
                base64.b64encode(v.astype("<f4").tobytes()).decode() if as_b64 else v.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        data.reverse()  # indexes, not order, say which vector is whose
        if call.bad_rows:
            _spoil(data, call.bad_rows)
        answer: dict[str, Any] = {"object": "list", "data": data, "model": "fake"}
        if self.embed_counts:
            n = len(call.texts) * 3
            answer["usage"] = {"prompt_tokens": n, "total_tokens": n}
        return _json(answer)

    async def _voyage(self, request: Request) -> Response:
        early, call = await self._serve(request, "input")
        if early is not None:
            return early
        dims = call.body.get("output_dimension")
        data = [
            {"object": "embedding", "index": i, "embedding": self._vec(t, dims).tolist()}
            for i, t in enumerate(call.texts)
        ]
        return _json(
            {
                "object": "list",
                "data": data,
                "model": call.body["model"],
                "usage": {"total_tokens": 7},
            }
        )

    async def _cohere(self, request: Request) -> Response:
        early, call = await self._serve(request, "texts")
        if early is not None:
            return early
        if "input_type" not in call.body:
            return _json({"message": "valid input_type must be provided"}, 400)
        vectors = [self._vec(t, call.body.get("output_dimension")).tolist() for t in call.texts]
        return _json(
            {
                "id": "x",
                "response_type": "embeddings_by_type",
                "embeddings": {"float": vectors},
                "texts": call.texts,
                "meta": {"billed_units": {"input_tokens": 5}},
            }
        )

    async def _tei(self, request: Request) -> Response:
        early, call = await self._serve(request, "inputs")
        if early is not None:
            return early
        dims = call.body.get("dimensions")
        return _json([self._vec(t, dims).tolist() for t in call.texts])

    # -- rerank ----------------------------------------------------------------------------

    @staticmethod
    def _ranked(call: Call, top: int | None) -> list[tuple[int, float]]:
        query = call.body["query"]
        scored = [(i, score_for(query, d)) for i, d in enumerate(call.texts)]
        return sorted(scored, key=lambda pair: pair[1], reverse=True)[:top]

    async def _tei_rerank(self, request: Request) -> Response:
        early, call = await self._serve(request, "texts")
        if early is not None:
            return early
        query = call.body["query"]
        rows = [
            {"index": i, "score": logit_for(query, call.texts[i]) if call.body["raw_scores"] else s}
            for i, s in self._ranked(call, None)
        ]
        counted = {"x-compute-tokens": str(4 * len(rows))} if self.rerank_counts else {}
        return _json(rows, headers=counted)

    async def _cohere_rerank(self, request: Request) -> Response:
        early, call = await self._serve(request, "documents")
        if early is not None:
            return early
        if "model" not in call.body:
            return _json({"message": "model is required"}, 400)
        results = [
            {"index": i, "relevance_score": s}
            for i, s in self._ranked(call, call.body.get("top_n"))
        ]
        return _json({"id": "x", "results": results, "meta": {"billed_units": {"search_units": 1}}})

    async def _voyage_rerank(self, request: Request) -> Response:
        early, call = await self._serve(request, "documents")
        if early is not None:
            return early
        data = [
            {"index": i, "relevance_score": s}
            for i, s in self._ranked(call, call.body.get("top_k"))
        ]
        usage = {"total_tokens": 6 * len(call.texts)}
        return _json({"object": "list", "data": data, "model": call.body["model"], "usage": usage})

    async def _jina_rerank(self, request: Request) -> Response:
        early, call = await self._serve(request, "documents")
        if early is not None:
            return early
        with_docs = call.body.get("return_documents", True)  # Jina's default
        results = [
            {
                "index": i,
                "relevance_score": s,
                **({"document": {"text": call.texts[i]}} if with_docs else {}),
            }
            for i, s in self._ranked(call, call.body.get("top_n"))
        ]
        usage = {"total_tokens": 5 * len(call.texts), "prompt_tokens": 5 * len(call.texts)}
        return _json({"model": call.body["model"], "results": results, "usage": usage})

    async def _info(self, request: Request) -> Response:
        self.info_paths.append(request.url.path)
        if self.info_status != 200:
            return _json({"error": "unavailable"}, self.info_status)
        return _json({"model_id": self.model_id, "max_client_batch_size": self.max_texts or 64})

    def _vec(self, text: str, dims: int | None) -> np.ndarray:
        v = vector_for(text)
        return v[:dims] if dims and not self.ignore_dimensions else v


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


FAKE_BYTES_PER_TOKEN = 2  # denser than the router's reckoning (3), as real text can be


def fake_tokens(text: str) -> int:
    """The fake's count of a text's tokens, for ``max_batch_tokens``."""
    return -(-len(text.encode()) // FAKE_BYTES_PER_TOKEN)


def _tei_refuse_size(n: int, most: int, status: int = 422) -> Response:
    """TEI's refusal of a call with more inputs than ``--max-client-batch-size``."""
    body = {
        "error": f"batch size {n} > maximum allowed batch size {most}",
        "error_type": "Validation",
    }
    return _json(body, status)


def _refuse_tokens(path: str, model: str | None, cap: int, sent: int) -> Response:
    """The vendor's refusal of a call whose texts hold more tokens than it takes per call:
    Voyage's ``detail`` and OpenAI's ``max_tokens_per_request`` error, in their own words."""
    if path.startswith("/voyage/"):
        detail = (
            f"Request to model '{model}' failed. The max allowed tokens per submitted batch is "
            f"{cap}. Your batch has {sent} tokens after truncation. Please lower the number of "
            "tokens in the batch."
        )
        return _json({"detail": detail}, 400)
    error = {
        "message": f"Requested {sent} tokens, max {cap} tokens per request",
        "type": "max_tokens_per_request",
        "param": None,
        "code": "max_tokens_per_request",
    }
    return _json({"error": error}, 400)


def _refuse_long(path: str, max_chars: int, tei_status: int = 422) -> Response:
    """The API's own refusal of an input over its length (TEI's 422, 413 before 2026-02;
    OpenAI's 400)."""
    if path == "/embed":
        body: Any = {
            "error": f"Input validation error: `inputs` must have less than {max_chars} tokens",
            "error_type": "Validation",
        }
        return _json(body, tei_status)
    message = f"This model's maximum context length is {max_chars} tokens"
    return _json({"error": {"message": message, "type": "invalid_request_error"}}, 400)


def _spoil(data: list[dict[str, Any]], how: str) -> None:
    """Make an OpenAI ``data`` list wrong in place (``Fault.bad_rows``)."""
    data.sort(key=lambda row: row["index"])
    for i, row in enumerate(data):
        if how == "dup_index":
            row["index"] = 0 if i == 1 else i
        elif how == "out_of_range":
            row["index"] = i + 5
        elif how == "ragged" and i == 0:
            emb = row["embedding"]
            row["embedding"] = emb[:2] if isinstance(emb, list) else emb[:16]  # 3 floats


def _drip(every: float) -> Response:
    """Headers at once, then a promised body one byte every ``every`` seconds."""

    async def body() -> Any:
        for _ in range(100_000):
            yield b" "
            await asyncio.sleep(every)

    return StreamingResponse(
        body(), media_type="application/json", headers={"content-length": "100000"}
    )


class _ResetResponse(Response):
    """Promise a body, send half of it, then fail: the client sees the connection drop."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1000"), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"data": [', "more_body": True})
        raise ConnectionResetError("injected reset")


Fake = TypeVar("Fake", bound=FakeUpstream)


@contextmanager
def serving(fake: Fake) -> Iterator[Fake]:
    """``fake`` (a ``FakeUpstream``, or one made to misbehave) started, stopped on exit."""
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@contextmanager
def running_upstream() -> Iterator[FakeUpstream]:
    """A started ``FakeUpstream``, stopped on exit."""
    with serving(FakeUpstream()) as fake:
        yield fake


# Fast knobs for tests: short waits and backoffs, so every scenario runs in well under a second.
FAST: dict[str, Any] = {
    "max_wait_ms": 20,
    "backoff_base_ms": 5,
    "backoff_max_s": 0.05,
    "timeout_s": 2.0,
    "retry_budget_s": 5.0,
}


def endpoint(upstream: FakeUpstream, kind: str) -> str:
    return {
        "openai": upstream.url,
        "voyage": upstream.url + "/voyage/v1/embeddings",
        "cohere": upstream.url + "/v2/embed",
        "tei": upstream.url,
    }[kind]


def rerank_path(kind: str) -> str:
    """Where each provider type's rerank calls land on the fake."""
    return {
        "openai": "/v1/rerank",
        "voyage": "/voyage/v1/rerank",
        "cohere": "/v2/rerank",
        "tei": "/rerank",
    }[kind]


def provider(name: str, upstream: FakeUpstream, kind: str = "openai", **kw: Any) -> ProviderConfig:
    """A provider config pointed at ``upstream`` with the fast test knobs."""
    fields = {**FAST, "model": f"{name}-model", "endpoint": endpoint(upstream, kind), **kw}
    return ProviderConfig(name=name, type=kind, **fields)
