"""Proxy headers read by the connection (serve/forwarded.py): what uvicorn's middleware does,
with the server's ``proxy_headers`` off and no ASGI layer around the app."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from embedplex.config import Settings
from embedplex.serve import server as serve_module
from embedplex.serve.edge import EdgeLimits
from embedplex.serve.forwarded import ForwardedHeaders
from wire import edge_server


def scope(client: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "type": "http",
        "scheme": "http",
        "client": (client, 50000),
        "headers": [(b"host", b"t"), *headers],
    }


CASES = [
    scope("127.0.0.1"),
    scope("127.0.0.1", (b"x-forwarded-for", b"203.0.113.7")),
    scope("127.0.0.1", (b"x-forwarded-for", b"198.51.100.2, 203.0.113.7")),
    scope("127.0.0.1", (b"x-forwarded-for", b"203.0.113.7"), (b"x-forwarded-for", b"10.0.0.9")),
    scope("127.0.0.1", (b"x-forwarded-proto", b"https")),
    scope("127.0.0.1", (b"x-forwarded-proto", b"gopher")),
    scope("127.0.0.1", (b"x-forwarded-for", b"")),
    scope("127.0.0.1", (b"x-forwarded-for", b"[2001:db8::1]:443"), (b"x-forwarded-proto", b"wss")),
    scope("192.0.2.50", (b"x-forwarded-for", b"203.0.113.7"), (b"x-forwarded-proto", b"https")),
]


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    return None


@pytest.mark.parametrize("trusted", ["127.0.0.1", "*", "10.0.0.0/8", ["127.0.0.1", "10.0.0.9"]])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_scope_becomes_what_uvicorns_middleware_makes_it(trusted: Any, case: int) -> None:
    ours, theirs = copy.deepcopy(CASES[case]), copy.deepcopy(CASES[case])
    ForwardedHeaders(trusted).apply(ours)
    asyncio.run(ProxyHeadersMiddleware(_nothing, trusted_hosts=trusted)(theirs, _nothing, _nothing))
    assert ours == theirs


async def whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = orjson.dumps({"client": scope["client"][0], "scheme": scope["scheme"]})
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


FORWARDED = {"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"}


def test_a_trusted_proxy_names_the_client_on_a_real_connection() -> None:
    forwarded = ForwardedHeaders("127.0.0.1")
    with edge_server(whoami, EdgeLimits(), forwarded, proxy_headers=False) as port:
        url = f"http://127.0.0.1:{port}/"
        with httpx.Client() as client:
            assert client.get(url, headers=FORWARDED).json() == {
                "client": "203.0.113.7",
                "scheme": "https",
            }
            assert client.get(url).json() == {"client": "127.0.0.1", "scheme": "http"}


def test_an_untrusted_peer_cannot_name_the_client() -> None:
    forwarded = ForwardedHeaders("10.1.2.3")
    with edge_server(whoami, EdgeLimits(), forwarded, proxy_headers=False) as port:
        answer = httpx.get(f"http://127.0.0.1:{port}/", headers=FORWARDED).json()
        assert answer == {"client": "127.0.0.1", "scheme": "http"}


class _Built(Exception):
    pass


def test_serve_reads_proxy_headers_in_the_connection_as_uvicorn_would_trust_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``serve``: uvicorn's own middleware off, the connection's rewrite trusting what uvicorn
    would (``$FORWARDED_ALLOW_IPS``), and the pipeline called straight, not the app."""
    seen: dict[str, Any] = {}

    def capture(self: Any, config: Any, app: Any, **kwargs: Any) -> None:
        seen["config"], seen["app"] = config, app
        raise _Built

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.9.8.7")
    monkeypatch.setenv("EMBEDPLEX_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(serve_module._DrainingServer, "__init__", capture)
    monkeypatch.setattr(serve_module, "tune_process", lambda: None)
    with pytest.raises(_Built):
        serve_module.serve(Settings())
    config = seen["config"]
    assert config.proxy_headers is False
    assert config.forwarded_allow_ips == "10.9.8.7"
    forwarded = config.http.forwarded
    assert isinstance(forwarded, ForwardedHeaders)
    trusted = scope("10.9.8.7", (b"x-forwarded-for", b"203.0.113.7"))
    forwarded.apply(trusted)
    assert trusted["client"] == ("203.0.113.7", 0)
    assert config.app is seen["app"].edge
