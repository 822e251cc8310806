"""examples/ray.toml served for real: two Ray Serve replicas behind one gateway process.

One local Ray cluster per module (2 CPUs, no dashboard), started here in the test process; the
gateway (``embedplex serve --config examples/ray.toml``, a subprocess) connects to it through
RAY_ADDRESS and deploys the replicas. The test process kills a replica through Ray itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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
def ray_cluster() -> Iterator[str]:
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=False,
        namespace="embedplex-tests",
    )
    try:
        yield str(context.address_info["gcs_address"])
    finally:
        ray.shutdown()


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


async def _load(
    base: str, clients: int, stop: asyncio.Event, texts: list[str]
) -> list[httpx.Response]:
    """``clients`` callers sending one request after another until ``stop``."""
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def caller(k: int) -> None:
            while not stop.is_set():
                body = {"model": "minilm", "input": texts[k % len(texts) :][:4] or texts[:1]}
                answers.append(await client.post("/v1/embeddings", json=body))

        await asyncio.gather(*(caller(k) for k in range(clients)))
    return answers


def test_two_replicas_both_serve_and_match_sentence_transformers(
    gateway: str, reference: np.ndarray
) -> None:
    stop = asyncio.Event()

    async def run() -> list[httpx.Response]:
        task = asyncio.ensure_future(_load(gateway, 8, stop, TEXTS))
        await asyncio.sleep(0)  # the callers start
        while len(_status(gateway)["requests_per_replica"]) < 2:
            await asyncio.sleep(0.3)
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
    clients = 8
    before = _status(gateway)
    known = set(before["requests_per_replica"])
    replicas = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#")
    ]
    assert len(replicas) == 2, replicas
    victim = replicas[0]
    stop = asyncio.Event()

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        task = asyncio.ensure_future(_load(gateway, clients, stop, TEXTS))
        await asyncio.sleep(1.0)  # under load on both replicas
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        # Serve replaces it: wait for a new replica to answer, the load running all along.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = _status(gateway)
            new = set(status["requests_per_replica"]) - known
            if new and status["replicas"].get("RUNNING") == 2:
                break
            await asyncio.sleep(0.5)
        stop.set()
        during = await task
        stop.clear()
        after_stop = asyncio.Event()
        after_task = asyncio.ensure_future(_load(gateway, clients, after_stop, TEXTS))
        await asyncio.sleep(2.0)
        after_stop.set()
        return during, await after_task

    during, after = asyncio.run(asyncio.wait_for(run(), 150))
    status = _status(gateway)
    failed = [a for a in during if a.status_code != 200]
    print(
        f"during the kill: {len(during)} requests, {len(failed)} failed, "
        f"{status['retries']} retried; after: {len(after)}; split {status['requests_per_replica']}"
    )
    # Only what was in flight on the dead replica could fail, and it fails as a clear 503.
    assert len(failed) <= clients
    for answer in failed:
        assert answer.status_code == 503, answer.text
        assert "Ray replica" in answer.json()["error"]["message"]
    assert status["retries"] + len(failed) >= 1  # something was in flight on it
    assert set(status["requests_per_replica"]) - known, "no new replica served"
    assert status["replicas"].get("RUNNING") == 2
    assert after and all(a.status_code == 200 for a in after)
