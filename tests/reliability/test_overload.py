"""Overload at 4x saturation: clients that retry at once, and what the server does with them.

Saturation is the server's in-flight limit (``max_concurrent_requests``): that many clients keep
it fully busy. Four times as many clients, each sending its next request the moment it has an
answer (a 429 included: the retry storm), for a fixed time. The server must answer only 200,
429 or 503, refuse fast, keep every accepted request's wait bounded, and serve normally after.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from procs import FULL, fake_server, percentile, record

SATURATION = 8  # the in-flight limit: this many clients saturate the server
CLIENTS = 4 * SATURATION
SECONDS = 20.0 if FULL else 4.0
BATCH_DELAY_S = 0.02  # the fake backend's time per batch


async def _storm(url: str) -> tuple[dict[int, int], list[float], list[float]]:
    """``CLIENTS`` closed-loop clients for ``SECONDS``: statuses, accepted and refused latencies."""
    statuses: dict[int, int] = {}
    accepted: list[float] = []
    refused: list[float] = []
    stop = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one_client(i: int) -> None:
            body = {"inputs": [f"client {i} says hello to the overloaded server"]}
            while time.monotonic() < stop:
                start = time.perf_counter()
                r = await client.post("/embed", json=body)
                took = time.perf_counter() - start
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    assert len(r.json()) == 1  # a whole answer, not a torn one
                    accepted.append(took)
                else:
                    assert r.headers["content-type"] == "application/json", r.text
                    refused.append(took)

        await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))
    return statuses, accepted, refused


async def test_overload_at_4x_saturation_refuses_fast_and_recovers(tiny_model_dir: Path) -> None:
    with fake_server(
        tiny_model_dir,
        backend={"delay": BATCH_DELAY_S},
        max_concurrent_requests=SATURATION,
        max_batch_requests=4,
        queue_timeout_ms=10_000,
    ) as srv:
        statuses, accepted, refused = await _storm(srv.url)
        # After the storm: the next request is served, and promptly (generous: a loaded box).
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            start = time.perf_counter()
            after = await client.post("/embed", json={"inputs": ["after the storm"]})
            recovery = time.perf_counter() - start
            ready = await client.get("/health/ready")
    total = sum(statuses.values())
    figures = {
        "clients": CLIENTS,
        "saturation": SATURATION,
        "seconds": SECONDS,
        "requests": total,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted_per_s": round(len(accepted) / SECONDS, 1),
        "accepted_p50_ms": round(percentile(accepted, 0.5) * 1000, 1),
        "accepted_p99_ms": round(percentile(accepted, 0.99) * 1000, 1),
        "accepted_max_ms": round(max(accepted, default=0) * 1000, 1),
        "refused_p50_ms": round(percentile(refused, 0.5) * 1000, 1),
        "refused_p99_ms": round(percentile(refused, 0.99) * 1000, 1),
        "recovery_ms": round(recovery * 1000, 1),
    }
    record("overload", **figures)
    assert set(statuses) <= {200, 429, 503}, figures
    assert statuses.get(200, 0) > 0 and statuses.get(429, 0) > 0, figures  # it was overloaded
    # Refusals are cheap: answered without waiting for the work ahead. The bound is generous:
    # the clients share two busy cores with the server (docs/reliability.md has the figures).
    assert percentile(refused, 0.99) < 3.0, figures
    # Accepted work waits behind at most the in-flight limit: well below the queue timeout.
    assert max(accepted) < 10.0, figures
    assert after.status_code == 200 and recovery < 2.0, figures
    assert ready.status_code == 200
