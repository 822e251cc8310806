"""Load check for the router example: N single-text requests from C concurrent callers.

    python examples/router_load.py --url http://127.0.0.1:8080 --model remote-minilm
    python examples/router_load.py --url http://127.0.0.1:8081            # straight upstream
    python examples/router_load.py --model remote-minilm --direct http://127.0.0.1:8081  # both

Prints throughput and p50/p99 latency; against a router it also prints how many upstream
calls the requests became (from GET /api/v1/status). Use --compare to check that the router's
vectors equal the upstream's for a few texts.

The load side uses aiohttp: with a hundred connections httpx's own pool costs more CPU than
the servers under test, and the figures would measure the client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import aiohttp
import httpx
import numpy as np


async def run(url: str, model: str | None, requests: int, callers: int) -> dict[str, Any]:
    latencies: list[float] = []
    per_caller = requests // callers
    connector = aiohttp.TCPConnector(limit=callers)
    headers = {}
    if os.environ.get("EMBEDPLEX_ADMIN_SECRET"):
        headers["authorization"] = f"Bearer {os.environ['EMBEDPLEX_ADMIN_SECRET']}"
    async with aiohttp.ClientSession(url, connector=connector) as client:

        async def upstream_calls() -> dict[str, int] | None:
            async with client.get("/api/v1/status", headers=headers) as status:
                if status.status != 200:
                    return None
                body = await status.json()
            return {
                name: p["counters"].get("upstream_calls", 0)
                for name, p in body.get("providers", {}).items()
            }

        async def caller(c: int) -> None:
            for i in range(per_caller):
                body: dict[str, Any] = {"input": f"caller {c} says hello number {i}"}
                if model:
                    body["model"] = model
                start = time.perf_counter()
                async with client.post("/v1/embeddings", json=body) as r:
                    r.raise_for_status()
                    await r.read()
                latencies.append(time.perf_counter() - start)

        before = await upstream_calls()
        start = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        elapsed = time.perf_counter() - start
        after = await upstream_calls()
    lat = np.sort(np.asarray(latencies)) * 1000
    out: dict[str, Any] = {
        "requests": len(latencies),
        "callers": callers,
        "seconds": round(elapsed, 3),
        "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }
    if before is not None and after is not None:
        out["upstream_calls"] = {name: n - before.get(name, 0) for name, n in after.items()}
    return out


async def compare(router: str, upstream: str, model: str) -> float:
    texts = ["hello", "the quick brown fox", "embedplex batches callers together"]
    async with httpx.AsyncClient(timeout=60) as client:
        a = await client.post(f"{router}/v1/embeddings", json={"model": model, "input": texts})
        b = await client.post(f"{upstream}/v1/embeddings", json={"input": texts})
    va = np.asarray([d["embedding"] for d in a.json()["data"]], np.float32)
    vb = np.asarray([d["embedding"] for d in b.json()["data"]], np.float32)
    return float(np.abs(va - vb).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--compare", default=None, help="upstream URL to compare vectors with")
    parser.add_argument("--direct", default=None, help="upstream URL to load right after")
    args = parser.parse_args()
    if args.compare:
        diff = asyncio.run(compare(args.url, args.compare, args.model or "remote-minilm"))
        print(f"max abs difference router vs upstream: {diff}")
    targets = [("router" if args.direct else args.url, args.url, args.model)]
    if args.direct:
        targets.append(("direct", args.direct, None))
    for name, url, model in targets:
        print(name, asyncio.run(run(url, model, args.requests, args.callers)))


if __name__ == "__main__":
    main()
