"""examples/ray.toml served for real: two Ray Serve replicas behind one gateway process.

One local Ray cluster per module (2 CPUs, no dashboard: ``conftest.py``), started in the test
process; the gateway (``embedplex serve --config examples/ray.toml``, a subprocess) connects to
it through RAY_ADDRESS and deploys the replicas. The test process kills a replica through Ray
itself.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from helpers import free_port
from reference import TEXTS, min_cosine

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.model]

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "ray.toml"
ADMIN = "ray-test-admin-secret"
APP = "embedplex-minilm"


@pytest.fixture(scope="module")
def gateway(
    ray_cluster: str, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("ray-gateway")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    env.update(
        EMBEDPLEX_CACHE_DIR=str(model_cache),
        EMBEDPLEX_DATA_DIR=str(tmp / "data"),
        EMBEDPLEX_ADMIN_SECRET=ADMIN,
        RAY_ADDRESS=ray_cluster,
    )
    log = (tmp / "gateway.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedplex", "serve", "--port", str(port), "--config", str(EXAMPLE)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base, tmp / "gateway.log", timeout=240)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"gateway not ready in {timeout}s:\n{log.read_text()[-3000:]}")


def _status(base: str) -> dict[str, Any]:
    r = httpx.get(base + "/api/v1/status", headers={"x-admin-secret": ADMIN}, timeout=10)
    assert r.status_code == 200, r.text
    model: dict[str, Any] = r.json()["models"]["minilm"]
    return model


async def _until(
    base: str, done: Callable[[dict[str, Any]], bool], seconds: float
) -> dict[str, Any]:
    """Poll the gateway's status (an admin route) until ``done`` holds for it."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(int(seconds / 0.25)):
            r = await client.get("/api/v1/status", headers={"x-admin-secret": ADMIN})
            model: dict[str, Any] = r.json()["models"]["minilm"]
            if done(model):
                return model
            await asyncio.sleep(0.25)
    raise AssertionError(f"status never reached the expected state: {model}")


async def _load(
    base: str, clients: int, stop: asyncio.Event, size: int = 4
) -> list[httpx.Response]:
    """``clients`` callers sending one request of ``size`` texts after another until ``stop``.

    Every text is new: replicas keep an embedding cache, and a repeated text is a hit that
    never reaches the model (a replica answering from its cache has no work in flight to lose).
    """
    answers: list[httpx.Response] = []
    sent = itertools.count()
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def caller(k: int) -> None:
            while not stop.is_set():
                n = next(sent)
                texts = [f"{TEXTS[(k + i) % len(TEXTS)]} ({n}.{i})" for i in range(size)]
                body = {"model": "minilm", "input": texts}
                answers.append(await client.post("/v1/embeddings", json=body))

        await asyncio.gather(*(caller(k) for k in range(clients)))
    return answers


def test_two_replicas_both_serve_and_match_sentence_transformers(
    gateway: str, reference: np.ndarray
) -> None:
    stop = asyncio.Event()

    async def run() -> list[httpx.Response]:
        task = asyncio.ensure_future(_load(gateway, 8, stop))
        await _until(gateway, lambda m: len(m["requests_per_replica"]) == 2, 60)
        stop.set()
        return await task

    answers = asyncio.run(asyncio.wait_for(run(), 120))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers[:3]]
    model = _status(gateway)
    split = model["requests_per_replica"]
    assert len(split) == 2 and all(n > 0 for n in split.values()), split
    assert model["replicas"].get("RUNNING") == 2, model["replicas"]
    print(f"requests per replica: {split}")

    tei = httpx.post(gateway + "/embed", json={"inputs": TEXTS, "truncate": True}, timeout=120)
    assert tei.status_code == 200, tei.text
    assert min_cosine(np.array(tei.json()), reference) >= 0.99999

    metrics = httpx.get(gateway + "/metrics", timeout=10).text
    assert 'embedplex_ray_replicas{model="minilm",state="RUNNING"} 2.0' in metrics
    for replica in split:
        assert f'replica="{replica}"' in metrics


def test_a_killed_replica_loses_only_its_in_flight_requests(gateway: str) -> None:
    """Requests in flight on a replica that dies are retried once on the other (or get 503);
    Serve starts a new replica and new requests keep succeeding all along."""
    clients = 4
    prefix = f"SERVE_REPLICA::{APP}#"
    actors = {
        a["name"].rsplit("#", 1)[-1]: a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    }
    assert len(actors) == 2, actors
    victim = sorted(actors)[0]
    before = _status(gateway)
    known = set(before["requests_per_replica"]) | set(actors)
    served = before["requests_per_replica"].get(victim, 0)
    stop = asyncio.Event()

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        # Requests of 16 texts keep each replica busy, so the victim dies with work in flight.
        task = asyncio.ensure_future(_load(gateway, clients, stop, size=16))
        await _until(gateway, lambda m: m["requests_per_replica"].get(victim, 0) > served, 60)
        ray.kill(ray.get_actor(actors[victim], namespace="serve"), no_restart=True)
        # Serve replaces it: wait until a new replica has answered, the load running all along.
        await _until(
            gateway,
            lambda m: (
                bool(set(m["requests_per_replica"]) - known) and m["replicas"].get("RUNNING") == 2
            ),
            90,
        )
        stop.set()
        during = await task
        later = asyncio.Event()
        after = asyncio.ensure_future(_load(gateway, clients, later))
        await asyncio.sleep(2.0)  # a load of known length, not a synchronization
        later.set()
        return during, await after

    during, after = asyncio.run(asyncio.wait_for(run(), 150))
    status = _status(gateway)
    failed = [a for a in during if a.status_code != 200]
    print(
        f"killed {victim}: {len(during)} requests during, {len(failed)} failed, "
        f"{status['retries']} retried on another replica; {len(after)} after, all 200; "
        f"requests per replica {status['requests_per_replica']}"
    )
    # Only what was in flight on the dead replica could fail, and then as a clear 503 (its retry
    # failed too, or, on a loaded CPU, it waited past the queue timeout on the one replica left).
    assert len(failed) <= clients
    for answer in failed:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["message"]
    assert status["retries"] + len(failed) >= 1  # it died with requests in flight
    assert set(status["requests_per_replica"]) - known, "no new replica served"
    assert status["replicas"].get("RUNNING") == 2
    assert after and all(a.status_code == 200 for a in after)
