"""Two ``embedplex serve`` processes on one PostgreSQL: a key created, rotated and revoked
through one is honoured by the other within 5 seconds (the store's change counter, polled).

The servers serve a remote route to a fake upstream (no model to load), so they start fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateways import ADMIN, PROPAGATION_S, create_key, embed, gateways, models, seconds_until
from redis_server import needs_redis_server, redis_server
from state_fixtures import pg_url  # noqa: F401  (fixture)
from upstream_fakes import provider, running_upstream


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[tuple[str, str, str]]:  # noqa: F811
    """Two gateways on one store; the third item is a provider's JSON to add at run time."""
    with running_upstream() as upstream, gateways(tmp_path, pg_url, upstream) as (one, two):
        yield one, two, provider("extra", upstream).model_dump_json()


@pytest.mark.slow
def test_a_change_on_one_replica_is_seen_by_the_other(replicas: tuple[str, str, str]) -> None:
    one, two, extra = replicas
    # Open until the first key exists.
    assert embed(two, "anything") == 200
    r = httpx.post(one + "/api/v1/keys", json={"name": "app"}, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    assert embed(one, key) == 200
    # The other replica learns that keys are now required, and knows the key.
    assert seconds_until(lambda: embed(two, "anything") == 401) < PROPAGATION_S
    assert embed(two, key) == 200  # verified once, then cached
    rotated = httpx.post(
        one + "/api/v1/keys/rotate", json={"name": "app"}, headers=ADMIN, timeout=10
    ).json()["key"]
    assert seconds_until(lambda: embed(two, key) == 401) < PROPAGATION_S
    assert embed(two, rotated) == 200
    # A provider added at run time on one replica is served by the other, and removed again.
    body = f'{{"provider": {extra}, "serve_as": "extra-model"}}'
    added = httpx.post(
        one + "/api/v1/providers",
        content=body,
        headers={**ADMIN, "content-type": "application/json"},
        timeout=10,
    )
    assert added.status_code == 201, added.text
    assert embed(one, rotated, "extra-model") == 200
    assert seconds_until(lambda: "extra-model" in models(two, rotated)) < PROPAGATION_S
    assert embed(two, rotated, "extra-model") == 200
    gone = httpx.delete(one + "/api/v1/providers/extra", headers=ADMIN, timeout=10)
    assert gone.status_code == 200, gone.text
    assert seconds_until(lambda: "extra-model" not in models(two, rotated)) < PROPAGATION_S
    assert httpx.delete(one + "/api/v1/keys/app", headers=ADMIN, timeout=10).status_code == 200
    assert embed(one, rotated) == 401  # at once where it was revoked
    assert seconds_until(lambda: embed(two, rotated) == 401) < PROPAGATION_S


@pytest.mark.slow
@needs_redis_server
def test_two_gateways_on_one_redis_limit_a_key_once(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """A key's requests per minute are one budget across replicas sharing Redis: their combined
    traffic is limited once (per-process limits would let each replica pass the whole budget)."""
    rpm = 6
    with (
        redis_server() as redis,
        running_upstream() as upstream,
        gateways(tmp_path, pg_url, upstream, EMBEDPLEX_REDIS_URL=redis.url) as (one, two),
    ):
        key = create_key(one, "app", rpm=rpm)
        statuses: list[int] = []
        # Replica two learns of the key within the propagation bound (401 until then: an
        # unknown key is refused before the limiter, so those cost the key nothing).
        seconds_until(lambda: statuses.append(embed(two, key)) or statuses[-1] != 401)
        statuses = [s for s in statuses if s != 401]
        for i in range(2 * rpm):
            statuses.append(embed(one if i % 2 else two, key))
    assert statuses.count(200) == rpm, statuses
    assert statuses.count(429) == len(statuses) - rpm, statuses
