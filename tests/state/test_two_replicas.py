"""Two ``embedplex serve`` processes on one PostgreSQL: a key created, rotated and revoked
through one is honoured by the other within 5 seconds (the store's change counter, polled).

The servers serve a remote route to a fake upstream (no model to load), so they start fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embedplex.cli.providers import toml_block
from helpers import free_port, wait_ready
from redis_server import needs_redis_server, redis_server
from state_fixtures import pg_url  # noqa: F401  (fixture)
from upstream_fakes import provider, running_upstream

ROOT = Path(__file__).parents[2]
ADMIN = {"authorization": "Bearer admin-secret"}
PROPAGATION_S = 5.0  # the documented bound (docs/keys.md)


def spawn(config: Path, port: int, state_url: str, **extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    env.update(extra)
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        EMBEDPLEX_STATE_URL=state_url,
        EMBEDPLEX_ADMIN_SECRET="admin-secret",
        # The fake upstream listens on loopback: the operator allows it for run-time providers.
        EMBEDPLEX_PROVIDER_ALLOWED_NETWORKS='["127.0.0.0/8"]',
    )
    return subprocess.Popen(
        [sys.executable, "-m", "embedplex", "serve", "--config", str(config), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[tuple[str, str, str]]:  # noqa: F811
    yield from _replicas(tmp_path, pg_url)


def _replicas(tmp_path: Path, state_url: str, **extra: str) -> Iterator[tuple[str, str, str]]:
    """Two gateways on one store (and ``extra`` environment), serving a fake upstream."""
    with running_upstream() as upstream:
        config = tmp_path / "replica.toml"
        config.write_text(
            "local_model = false\n"
            + toml_block(provider("up", upstream))
            + '\n[[routes]]\nmodel = "remote"\nproviders = ["up"]\n'
        )
        ports = free_port(), free_port()
        procs = [spawn(config, port, state_url, **extra) for port in ports]
        bases = tuple(f"http://127.0.0.1:{port}" for port in ports)
        try:
            for proc, base in zip(procs, bases, strict=True):
                wait_ready(proc, base, timeout=90)
            extra = provider("extra", upstream).model_dump_json()
            yield bases[0], bases[1], extra
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                if proc.stdout:
                    proc.stdout.close()


def embed(base: str, key: str, model: str = "remote") -> int:
    r = httpx.post(
        base + "/v1/embeddings",
        json={"input": "hello", "model": model},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    return r.status_code


def models(base: str, key: str) -> set[str]:
    r = httpx.get(base + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"]}


def seconds_until(check: object, limit: float = 15.0) -> float:
    """How long until ``check()`` holds (polled every 0.1 s); fails past ``limit``."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - start > limit:
            raise AssertionError("never happened")
        time.sleep(0.1)
    return time.monotonic() - start


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


@needs_redis_server
def test_two_gateways_on_one_redis_limit_a_key_once(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """A key's requests per minute are one budget across replicas sharing Redis: their combined
    traffic is limited once (per-process limits would let each replica pass the whole budget)."""
    rpm = 6
    with redis_server() as redis:
        gateways = _replicas(tmp_path, pg_url, EMBEDPLEX_REDIS_URL=redis.url)
        one, two, _ = next(gateways)
        try:
            r = httpx.post(
                one + "/api/v1/keys", json={"name": "app", "rpm": rpm}, headers=ADMIN, timeout=10
            )
            assert r.status_code == 201, r.text
            key = r.json()["key"]
            statuses = []
            # Replica two learns of the key within the propagation bound (401 until then: an
            # unknown key is refused before the limiter, so those cost the key nothing).
            seconds_until(lambda: statuses.append(embed(two, key)) or statuses[-1] != 401)
            statuses = [s for s in statuses if s != 401]
            for i in range(2 * rpm):
                statuses.append(embed(one if i % 2 else two, key))
        finally:
            gateways.close()
    assert statuses.count(200) == rpm, statuses
    assert statuses.count(429) == len(statuses) - rpm, statuses
