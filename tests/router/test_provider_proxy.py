"""A provider of the config file behind an egress proxy (``proxy``), through a real forward proxy.

``ForwardProxy`` is a small HTTP proxy on 127.0.0.1: it takes absolute-form requests
(``POST http://127.0.0.1:port/v1/embeddings HTTP/1.1``), checks ``Proxy-Authorization`` and sends
each on to its host, counting what it passed. Plain-http upstreams only: an https upstream goes
through ``CONNECT``, which is aiohttp's to speak. The proxy's credentials are never shown (config
show, provider listings, status, errors, logs), and a provider added at run time (admin API,
state store) may not name a proxy at all: the endpoint guard could not check its upstream.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from pydantic import ValidationError
from test_admin_hardening import ADMIN, serve

from conftest import RouterFactory
from embedplex.config import Settings
from embedplex.core.errors import UpstreamError
from embedplex.core.types import EmbedRequest
from embedplex.providers.config import ProviderConfig, RouteConfig
from upstream_fakes import FakeUpstream, provider, vector_for

USER, PASSWORD = "egress", "s3cr:t pw"  # a ':' and a space: percent-escaped in the URL
QUOTED = "s3cr%3At%20pw"
ROUTE = RouteConfig(model="m", providers=["o"])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class ForwardProxy:
    """An HTTP forward proxy: one absolute-form request per connection, sent on to its host
    with ``Connection: close``; ``CONNECT`` answers 405. With ``auth`` set, a request whose
    ``Proxy-Authorization`` is not it answers 407, echoing what it got, decoded too (a careless
    proxy)."""

    def __init__(self, auth: str | None = None) -> None:
        self.auth = auth
        self.passed: list[tuple[str, str]] = []  # (method, absolute target)
        self.refused = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}{'@' if userinfo else ''}127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.rstrip("\r\n").split("\r\n")
            method, target, _ = request_line.split(" ")
            headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines]
            named = {name.lower(): value for name, value in headers}
            body = await reader.readexactly(int(named.get("content-length", "0")))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            got = named.get("proxy-authorization")
            if self.auth is not None and got != self.auth:
                self.refused += 1
                said = base64.b64decode((got or "").partition(" ")[2]).decode()
                text = f"proxy authentication failed for {said!r} ({got})".encode()
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="egress"\r\nConnection: close\r\n'
                    + f"Content-Length: {len(text)}\r\n\r\n".encode()
                    + text
                )
                return
            url = urlsplit(target)
            assert url.scheme == "http" and url.hostname, target  # absolute-form
            upstream_reader, upstream_writer = await asyncio.open_connection(
                url.hostname, url.port or 80
            )
            path = url.path + (f"?{url.query}" if url.query else "")
            hop = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
            sent = [f"{n}: {v}" for n, v in headers if n.lower() not in hop]
            upstream_writer.write(
                f"{method} {path} HTTP/1.1\r\n".encode("latin-1")
                + "\r\n".join([*sent, "Connection: close", "", ""]).encode("latin-1")
                + body
            )
            answer = await upstream_reader.read()  # to the upstream's close
            upstream_writer.close()
            self.passed.append((method, target))
            writer.write(answer)
        finally:
            await writer.drain()
            writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    fp = ForwardProxy(auth=basic(USER, PASSWORD))
    await fp.start()
    yield fp
    await fp.close()


def req(*texts: str) -> EmbedRequest:
    return EmbedRequest(inputs=list(texts), cache=False)


async def test_a_providers_calls_go_through_its_proxy_and_no_other(
    proxy: ForwardProxy,
    upstream: FakeUpstream,
    make_router: RouterFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The environment's proxy variables stay ignored: the provider without ``proxy`` goes
    # straight to its upstream.
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    monkeypatch.setenv("http_proxy", proxy.url())
    via = proxy.url(f"{USER}:{QUOTED}")
    router = await make_router(
        provider("o", upstream, proxy=via),
        provider("t", upstream, "tei", proxy=via),  # its GET /info goes through it too
        provider("direct", upstream),
    )
    for name in ("o", "t"):
        result = await router.embed(req("a", "b"), [name])
        for v, text in zip(result.vectors, ("a", "b"), strict=True):
            np.testing.assert_array_equal(v, vector_for(text))
    assert ("GET", f"{upstream.url}/info") in proxy.passed
    posts = [target for method, target in proxy.passed if method == "POST"]
    assert posts == [f"{upstream.url}/v1/embeddings", f"{upstream.url}/embed"]
    assert proxy.refused == 0
    assert all("proxy-authorization" not in c.headers for c in upstream.calls)

    await router.embed(req("c"), ["direct"])
    assert len(proxy.passed) == 3  # nothing more: the direct provider connected itself
    assert len(upstream.calls) == 3


async def test_wrong_proxy_credentials_fail_and_no_text_shows_them(
    proxy: ForwardProxy,
    upstream: FakeUpstream,
    make_router: RouterFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "n0t-the:pw"
    config = provider("o", upstream, proxy=proxy.url(f"{USER}:{wrong}"), max_attempts=1)
    router = await make_router(config)
    with pytest.raises(UpstreamError, match="407") as failed:
        await router.embed(req("a"), ["o"])
    assert proxy.refused == 1 and upstream.calls == []
    token = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
    # The proxy echoed the credentials it got: what reaches the caller has them as ***.
    assert "***" in failed.value.message
    stats = router.stats()["o"]
    shown = [failed.value.message, caplog.text, str(stats), str(router.runtimes["o"].counters)]
    for text in shown:
        assert wrong not in text and token not in text and "n0t-the" not in text
    assert stats["proxy"] == f"http://***@127.0.0.1:{proxy.port}"


def test_settings_show_a_proxy_without_its_credentials(proxy: ForwardProxy) -> None:
    via = proxy.url(f"{USER}:{QUOTED}")
    config = ProviderConfig(name="o", type="openai", endpoint="http://127.0.0.1:9", proxy=via)
    settings = Settings(local_model=False, providers=[config], routes=[ROUTE])
    shown = settings.redacted()["providers"][0]
    assert shown["proxy"] == f"http://***@127.0.0.1:{proxy.port}"
    assert QUOTED not in str(settings.redacted()) and USER not in str(settings.redacted())


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("socks5://u:hunter22@127.0.0.1:1080", "http:// or https://"),
        ("ftp://u:hunter22@proxy.example", "http:// or https://"),
        ("http://u:hunter22@proxy.example:3128/path", "no more"),
        ("http://u:hunter22@proxy.example:3128/?x=1", "no more"),
        ("http://u:hunter22@169.254.169.254:80", "metadata"),
        ("http://u:hunter22@", "http:// or https://"),
    ],
)
def test_a_proxy_is_an_http_url_and_its_refusal_never_shows_it(url: str, why: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ProviderConfig(name="o", type="openai", proxy=url)
    assert why in str(refused.value)
    assert "hunter22" not in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        Settings(
            local_model=False,
            providers=[{"name": "o", "type": "openai", "proxy": url}],
            routes=[ROUTE],
        )
    assert why in str(refused.value)
    assert "hunter22" not in str(refused.value)


async def test_a_provider_added_at_run_time_may_not_name_a_proxy(
    proxy: ForwardProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The admin API answers 422 with nothing changed; a stored provider that names one (a
    store written by hand, or by another version) is refused when it is applied; the config
    file's proxied provider is listed with its proxy's credentials as ***."""
    config = provider("a", upstream, proxy=proxy.url(f"{USER}:{QUOTED}"))
    served = serve(upstream, providers=[config], provider_allowed_networks=["127.0.0.0/8"])
    async with served as (app, client):
        r = await client.post("/v1/embeddings", json={"model": "served", "input": "hi"})
        assert r.status_code == 200, r.text
        assert len(proxy.passed) == 1
        listed = (await client.get("/api/v1/providers", headers=ADMIN)).json()["data"]
        assert listed[0]["proxy"] == f"http://***@127.0.0.1:{proxy.port}"
        status = (await client.get("/api/v1/status", headers=ADMIN)).text
        assert "***@127.0.0.1" in status
        for text in (str(listed), status):
            assert QUOTED not in text and PASSWORD not in text and USER not in text

        added: dict[str, Any] = {"name": "new", "type": "openai", "endpoint": upstream.url}
        body = {"provider": {**added, "proxy": proxy.url()}, "serve_as": "new-model"}
        r = await client.post("/api/v1/providers", json=body, headers=ADMIN)
        assert r.status_code == 422, r.text
        assert "config file only" in r.json()["error"]
        gw = app.state.gateway
        assert sorted(gw.router.runtimes) == ["a"]
        sync = app.state.provider_sync
        assert await sync.providers.all() == {}  # nothing stored either

        caplog.set_level(logging.ERROR, logger="embedplex.state.providers")
        stored = ProviderConfig(**added, proxy=proxy.url(f"{USER}:{QUOTED}"))
        await sync.providers.put(stored, "new-model")
        await sync.apply(gw)
        assert sorted(gw.router.runtimes) == ["a"]
        assert "config file only" in caplog.text
        assert QUOTED not in caplog.text and PASSWORD not in caplog.text
        assert "new-model" not in {m.name for m in gw.models}
        # Without the proxy, the same provider goes in.
        body = {"provider": added, "serve_as": "new-model"}
        await sync.providers.delete("new")
        r = await client.post("/api/v1/providers", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
    assert len(proxy.passed) == 1
