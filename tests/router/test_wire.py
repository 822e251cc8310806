"""The router's wire (``providers/wire.py``) and the cheaper per-request paths beside it."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import itertools
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from conftest import RouterFactory
from embedplex.batching import Item
from embedplex.core.errors import InvalidRequestError
from embedplex.core.types import EmbedRequest
from embedplex.providers import endpoints
from embedplex.providers.adapter import decode_vector, decode_vectors
from embedplex.providers.endpoints import GuardedBackend, parse_networks
from embedplex.providers.lanes import collect
from embedplex.providers.wire import AiohttpTransport, WireClient, wire_client
from upstream_fakes import FakeUpstream, Fault, ThreadServer, provider

LIMITS = httpx.Limits(max_connections=8, max_keepalive_connections=8)


@pytest.fixture
async def wire() -> AsyncIterator[httpx.AsyncClient]:
    """A client on the wire with loopback allowed (what a config-file provider gets)."""
    backend = GuardedBackend(parse_networks(["127.0.0.0/8"]))
    async with httpx.AsyncClient(transport=AiohttpTransport(backend, limits=LIMITS)) as client:
        yield client


async def test_a_call_round_trips_status_headers_and_body(
    upstream: FakeUpstream, wire: httpx.AsyncClient
) -> None:
    body = {"input": ["a", "b"], "model": "m"}
    r = await wire.post(f"{upstream.url}/v1/embeddings", json=body, headers={"x-probe": "1"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert len(r.json()["data"]) == 2
    assert upstream.calls[-1].body == body
    assert upstream.calls[-1].headers["x-probe"] == "1"


async def test_an_error_answer_keeps_its_status_and_retry_after(
    upstream: FakeUpstream, wire: httpx.AsyncClient
) -> None:
    upstream.script(Fault(status=429, retry_after="7"))
    r = await wire.post(f"{upstream.url}/v1/embeddings", json={"input": ["a"]})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"


async def test_a_compressed_answer_is_decoded_once() -> None:
    plain = b'{"ok": true}'

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(send)
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": gzip.compress(plain)})

    server = ThreadServer(app)
    server.start()
    try:
        backend = GuardedBackend(parse_networks(["127.0.0.0/8"]))
        async with httpx.AsyncClient(transport=AiohttpTransport(backend, limits=LIMITS)) as c:
            r = await c.get(server.url)
    finally:
        server.stop()
    assert r.content == plain


async def test_a_slow_answer_is_a_read_timeout(
    upstream: FakeUpstream, wire: httpx.AsyncClient
) -> None:
    upstream.script(Fault(delay=2.0))
    with pytest.raises(httpx.ReadTimeout):
        await wire.post(f"{upstream.url}/v1/embeddings", json={"input": ["a"]}, timeout=0.2)


async def test_a_closed_port_is_a_connect_error(wire: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(httpx.ConnectError):
            await wire.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["a"]})


async def test_a_reset_connection_is_a_transport_error(
    upstream: FakeUpstream, wire: httpx.AsyncClient
) -> None:
    upstream.script(Fault(reset=True))
    with pytest.raises(httpx.TransportError):
        await wire.post(f"{upstream.url}/v1/embeddings", json={"input": ["a"]})


async def test_the_guard_refuses_a_literal_address_before_sending(
    upstream: FakeUpstream,
) -> None:
    backend = GuardedBackend([])  # nothing private allowed, loopback not trusted
    async with httpx.AsyncClient(transport=AiohttpTransport(backend, limits=LIMITS)) as client:
        with pytest.raises(httpx.ConnectError, match="not a public address"):
            await client.post(f"{upstream.url}/v1/embeddings", json={"input": ["a"]})
        with pytest.raises(httpx.ConnectError, match="metadata"):
            await client.get("http://169.254.169.254/latest/meta-data/", timeout=2)
    assert upstream.calls == []


async def test_the_guard_refuses_a_name_at_connect(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[endpoints.IPAddress]:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(endpoints, "resolve", resolve)
    backend = GuardedBackend([])
    async with httpx.AsyncClient(transport=AiohttpTransport(backend, limits=LIMITS)) as client:
        with pytest.raises(httpx.ConnectError, match="not a public address"):
            await client.get(f"http://private.test:{upstream.port}/info")
        backend.trusted = frozenset({"private.test"})  # a config-file host: metadata rule only
        r = await client.get(f"http://private.test:{upstream.port}/info")
    assert r.status_code == 200
    assert lookups == ["private.test", "private.test"]


async def test_the_router_calls_upstream_over_the_wire(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("a", upstream))
    assert isinstance(router.client._transport, AiohttpTransport)
    result = await router.embed(EmbedRequest(inputs=["x", "y"]), ["a"])
    assert len(result.vectors) == 2
    assert upstream.calls[-1].texts == ["x", "y"]


async def test_post_bytes_sends_what_post_sends(upstream: FakeUpstream) -> None:
    """The router's POST without httpx's client layers: same URL, body and headers."""
    backend = GuardedBackend(parse_networks(["127.0.0.0/8"]))
    url = f"{upstream.url}/v1/embeddings"
    # User-Agent: one of the client's defaults, replaced whatever its case.
    headers = {"authorization": "Bearer k", "content-type": "application/json", "User-Agent": "t"}
    content = orjson.dumps({"input": ["a", "b"], "model": "m"})
    async with wire_client(backend, limits=LIMITS, timeout=httpx.Timeout(5.0)) as client:
        via_httpx = await client.post(url, content=content, headers=headers, timeout=5.0)
        direct = await client.post_bytes(url, content, headers, 5.0)
        again = await client.post_bytes(url, content, headers, 5.0)  # from the kept target
    assert via_httpx.status_code == direct.status_code == again.status_code == 200
    assert direct.json() == via_httpx.json()
    first, second, third = upstream.calls[-3:]
    assert first.path == second.path == third.path == "/v1/embeddings"
    assert first.body == second.body == third.body
    assert first.headers == second.headers == third.headers
    assert second.headers["authorization"] == "Bearer k"
    assert second.headers["user-agent"] == "t"


async def test_post_bytes_keeps_the_guard_and_the_error_mapping(upstream: FakeUpstream) -> None:
    async with wire_client(GuardedBackend([]), limits=LIMITS, timeout=httpx.Timeout(5.0)) as c:
        with pytest.raises(httpx.ConnectError, match="not a public address"):
            await c.post_bytes(f"{upstream.url}/v1/embeddings", b"{}", {}, 5.0)
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.post_bytes("ftp://example.com/x", b"{}", {}, 5.0)
    assert upstream.calls == []
    upstream.script(Fault(delay=2.0))
    backend = GuardedBackend(parse_networks(["127.0.0.0/8"]))
    async with wire_client(backend, limits=LIMITS, timeout=httpx.Timeout(5.0)) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post_bytes(f"{upstream.url}/v1/embeddings", b'{"input": ["a"]}', {}, 0.2)


async def test_the_router_posts_through_post_bytes(
    upstream: FakeUpstream, make_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    original = WireClient.post_bytes

    async def spy(self: WireClient, url: str, *args: Any) -> httpx.Response:
        sent.append(url)
        return await original(self, url, *args)

    monkeypatch.setattr(WireClient, "post_bytes", spy)
    router = await make_router(provider("a", upstream))
    await router.embed(EmbedRequest(inputs=["x"]), ["a"])
    assert sent == [f"{upstream.url}/v1/embeddings"]


# -- decoding ------------------------------------------------------------------------------


def _b64(v: np.ndarray) -> str:
    return base64.b64encode(v.astype("<f4").tobytes()).decode()


def test_decode_vectors_equals_decoding_each_row() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((5, 7)).astype(np.float32)
    for raw in ([_b64(r) for r in rows], [r.tolist() for r in rows]):
        out = decode_vectors(raw)
        assert len(out) == 5
        for got, row in zip(out, raw, strict=True):
            np.testing.assert_array_equal(got, decode_vector(row))
            assert got.dtype == np.float32
        # Each vector is its own: no two share memory.
        assert not any(np.shares_memory(a, b) for a, b in itertools.combinations(out, 2))
    # Base64 rows: read-only arrays over their own decoded bytes (the cache keeps them as they
    # are); rows of floats: writable rows of one matrix (the cache copies them).
    b64 = decode_vectors([_b64(r) for r in rows])
    assert all(not v.flags.writeable and len(v.base) == v.nbytes for v in b64)
    assert all(v.flags.writeable for v in decode_vectors([r.tolist() for r in rows]))


def test_decode_vectors_rejects_what_decode_vector_rejects() -> None:
    good = _b64(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="multiple of element size"):
        decode_vectors([good, good[:-4]])  # ragged base64: row by row, which refuses it
    with pytest.raises(ValueError, match="expected a list of floats"):
        decode_vectors([[1.0, 2.0], []])
    with pytest.raises(ValueError, match="expected a list of floats"):
        decode_vectors([[]])
    with pytest.raises(ValueError, match="base64"):
        decode_vectors(["AAA"])  # not a multiple of four bytes
    for garbage in ("AAAA AAAA", "AAA=AAAA", "AAAA\nAAAA", "AAA*"):  # strict: never guessed
        with pytest.raises(ValueError, match="base64"):
            decode_vectors([garbage])
    with pytest.raises(TypeError):
        decode_vectors({"a": 1})
    with pytest.raises(ValueError, match="different widths"):  # one answer, one width
        decode_vectors([[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="different widths"):
        decode_vectors([good, _b64(np.ones(8, np.float32))])


# -- the per-request path ------------------------------------------------------------------


async def test_checked_parameters_are_kept_but_refusals_are_not(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("a", upstream))
    runtime = router.runtimes["a"]
    for _ in range(2):
        await router.embed(EmbedRequest(inputs=["x"]), ["a"])
        with pytest.raises(InvalidRequestError):  # openai cannot truncate: refused each time
            await router.embed(EmbedRequest(inputs=["x"], truncate=True), ["a"])
    assert len(runtime._checked) == 1
    odd = EmbedRequest(inputs=["x"], extra={"input_type": ["not", "text"]})
    with pytest.raises(InvalidRequestError, match="input_type"):  # not a key: checked, not kept
        await router.embed(odd, ["a"])
    assert len(runtime._checked) == 1


async def test_collect_of_one_item_cancels_it_when_the_caller_leaves() -> None:
    loop = asyncio.get_running_loop()
    item: Item[str, int] = Item("x", 1, loop.create_future(), 0.0, 0.0)
    counters: Counter[str] = Counter()
    waiter = asyncio.ensure_future(collect([item], counters, "requests"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert item.future.cancelled()
    assert counters == Counter(requests=1, requests_failed=1)
