"""Scale-out, end to end (docs/scale-out.md): two ``embedplex serve`` processes on different
ports over one PostgreSQL and one Redis behave as one gateway. A key's rate limit is one budget
across both, a key revoked through one is refused by both, and a provider added through one
gateway's admin API serves requests that arrive through the other.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from gateways import ADMIN, PROPAGATION_S, create_key, embed, gateways, models, seconds_until
from redis_server import needs_redis_server, redis_server
from state_fixtures import pg_url  # noqa: F401  (fixture)
from upstream_fakes import FakeUpstream, provider, running_upstream

RPM = 6


def limited_once(one: str, two: str, key: str) -> list[int]:
    """Statuses of the key's requests, alternating between the gateways until each has
    answered at least ``RPM`` of them (so either alone could have passed the whole budget)."""
    statuses: list[int] = []
    # Gateway two learns of the new key within the propagation bound; until then it answers
    # 401 (an unknown key is refused before the limiter, so those cost the budget nothing).
    seconds_until(lambda: statuses.append(embed(two, key)) or statuses[-1] != 401)
    statuses = [s for s in statuses if s != 401]
    for i in range(2 * RPM):
        statuses.append(embed(one if i % 2 else two, key))
    return statuses


def added_provider_serves_through_the_other(one: str, two: str, key: str, up: FakeUpstream) -> None:
    body = {"provider": provider("added", up).model_dump(mode="json"), "serve_as": "added-model"}
    r = httpx.post(one + "/api/v1/providers", json=body, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    assert seconds_until(lambda: "added-model" in models(two, key)) < PROPAGATION_S
    text = f"through-two-{uuid.uuid4().hex}"
    assert embed(two, key, "added-model", text) == 200
    # Served by the provider added through gateway one: its upstream got the text.
    assert any(text in call.texts for call in up.calls), [c.texts for c in up.calls]


@pytest.mark.slow
@needs_redis_server
def test_two_gateways_share_limits_revocations_and_providers(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    with (
        redis_server() as redis,
        running_upstream() as route_upstream,
        running_upstream() as added_upstream,
        gateways(tmp_path, pg_url, route_upstream, EMBEDPLEX_REDIS_URL=redis.url) as (one, two),
    ):
        limited = create_key(one, "limited", rpm=RPM)
        app = create_key(one, "app")

        statuses = limited_once(one, two, limited)
        assert statuses.count(200) == RPM, statuses  # not 2 x RPM: one budget, not one each
        assert statuses.count(429) == len(statuses) - RPM, statuses

        added_provider_serves_through_the_other(one, two, app, added_upstream)

        # Revoked through gateway two: refused there at once, and by gateway one (which has
        # verified and cached the key) within the poll bound. Authentication comes before the
        # limiter, so the exhausted key's 429 becomes 401 too.
        assert embed(one, app) == 200
        for name, key in (("app", app), ("limited", limited)):
            gone = httpx.delete(f"{two}/api/v1/keys/{name}", headers=ADMIN, timeout=10)
            assert gone.status_code == 200, gone.text
            assert embed(two, key) == 401
            assert seconds_until(lambda key=key: embed(one, key) == 401) < PROPAGATION_S
