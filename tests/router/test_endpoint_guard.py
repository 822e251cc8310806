"""The endpoint guard at connect time: DNS rebinding and names that resolve to the metadata
address (``providers/endpoints.py``, issue 14)."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.providers import endpoints
from embedplex.providers.config import ProviderConfig, RouteConfig
from embedplex.providers.endpoints import EndpointRefused, check_address
from upstream_fakes import FakeUpstream, provider

SECRET = "guard-admin-secret"
ADMIN = {"authorization": f"Bearer {SECRET}"}


class FakeDns:
    """Answers for made-up names (a list per name: one answer per lookup, the last repeats);
    every other name goes to the real resolver."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []
        self._real = endpoints.resolve

    async def __call__(self, host: str, port: int) -> list[Any]:
        if host not in self.answers:
            return await self._real(host, port)
        self.lookups.append(host)
        queue = self.answers[host]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        return [ipaddress.ip_address(answer)]


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


def settings(upstream: FakeUpstream, **kw: Any) -> Settings:
    return Settings(
        local_model=False,
        admin_secret=SECRET,
        providers=[provider("a", upstream)],
        routes=[RouteConfig(model="served", providers=["a"])],
        **kw,
    )


@pytest.mark.parametrize("allowed", [[], ["127.0.0.0/8"]])
async def test_a_name_rebound_to_a_private_address_is_refused_at_connect(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, allowed: list[str]
) -> None:
    # Public when the provider is added, loopback (where the upstream is) afterwards.
    dns = FakeDns({"rebind.test": ["93.184.216.34", "127.0.0.1"]})
    monkeypatch.setattr(endpoints, "resolve", dns)
    async with serve(settings(upstream, provider_allowed_networks=allowed)) as client:
        url = f"http://rebind.test:{upstream.port}"
        new = {"name": "rb", "type": "openai", "endpoint": url, "max_attempts": 1}
        added = await client.post(
            "/api/v1/providers", json={"provider": new, "serve_as": "rb-model"}, headers=ADMIN
        )
        assert added.status_code == 201, added.text
        r = await client.post("/v1/embeddings", json={"model": "rb-model", "input": "hi"})
    assert dns.lookups[:2] == ["rebind.test", "rebind.test"]  # at add time, then at connect
    if allowed:
        # Loopback allowed: the call goes to the address the guard checked (the system
        # resolver has never heard of rebind.test).
        assert r.status_code == 200, r.text
        assert upstream.calls[-1].headers["host"].startswith("rebind.test")
    else:
        assert r.status_code == 502, r.text
        assert "not a public address" in r.json()["error"]["message"]
        assert upstream.calls == []


async def test_a_config_provider_whose_name_resolves_to_the_metadata_address(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoints, "resolve", FakeDns({"meta.test": ["169.254.169.254"]}))
    metadata = ProviderConfig(
        name="m", type="openai", endpoint="http://meta.test/v1", max_attempts=1
    )
    s = Settings(
        local_model=False,
        providers=[metadata],
        routes=[RouteConfig(model="meta", providers=["m"])],
    )
    async with serve(s) as client:
        r = await client.post("/v1/embeddings", json={"model": "meta", "input": "hi"})
    assert r.status_code == 502
    assert "metadata" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("address", "allowed", "refused"),
    [
        ("8.8.8.8", [], False),
        ("2606:4700::1111", [], False),
        ("127.0.0.1", [], True),
        ("127.0.0.1", ["127.0.0.0/8"], False),
        ("10.1.1.1", ["10.0.0.0/16"], True),
        ("::ffff:10.1.1.1", ["10.0.0.0/8"], False),
        ("::ffff:127.0.0.1", [], True),
        ("224.0.0.1", [], True),
        ("169.254.169.254", ["0.0.0.0/0"], True),
        ("fd00:ec2::254", ["::/0"], True),
    ],
)
def test_check_address(address: str, allowed: list[str], refused: bool) -> None:
    networks = endpoints.parse_networks(allowed)
    if refused:
        with pytest.raises(EndpointRefused):
            check_address(ipaddress.ip_address(address), networks)
    else:
        check_address(ipaddress.ip_address(address), networks)
