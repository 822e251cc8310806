"""The router layer's CPU per routed request, in process (no HTTP in): ``RemoteModel.embed``.

C callers each send single-text requests (with a request deadline, as the pipeline sets one)
through a ``RemoteModel`` built from examples/router.toml's provider and route, to the fake
upstream (``embedplex.bench.fake_upstream``, always from this checkout) in a child process.
Prints this process's CPU per request (``time.process_time``); see docs/router.md ("Router CPU
per request"). The tree under test is the one on PYTHONPATH.

    python examples/router_cpu_inprocess.py --requests 20000 --callers 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import uvloop

from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
from embedplex.core.types import EmbedRequest
from embedplex.providers.config import ProviderConfig, RouteConfig
from embedplex.providers.router import RemoteModel, Router

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(port: int, requests: int, callers: int, warmup: int) -> float:
    config = tomllib.loads((HERE / "router.toml").read_text())
    provider = {**config["providers"][0], "endpoint": f"http://127.0.0.1:{port}"}
    router = Router([ProviderConfig(**provider)])
    model = RemoteModel(router, RouteConfig(**config["routes"][0]))
    per_caller = requests // callers

    async def caller(c: int, n: int) -> None:
        for i in range(n):
            REQUEST_DEADLINE.set(Deadline.after(60.0, "request_timeout_s"))
            result = await model.embed(EmbedRequest(inputs=[f"caller {c} says hello {i}"]))
            assert len(result.vectors) == 1

    async with router:
        await model.start()
        await asyncio.gather(*(caller(c, max(1, warmup // callers)) for c in range(callers)))
        start = time.process_time()
        await asyncio.gather(*(caller(c, per_caller) for c in range(callers)))
        used = time.process_time() - start
        counters = router.runtimes[provider["name"]].counters
        print(f"texts per upstream call: {counters['texts'] / counters['upstream_batches']:.1f}")
    return used / (per_caller * callers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1000)
    args = parser.parse_args()
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "embedplex.bench.fake_upstream", str(port)],
        env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")},
    )
    try:
        time.sleep(0.5)
        # uvloop, as the server runs under uvicorn's loop="auto".
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            per = runner.run(run(port, args.requests, args.callers, args.warmup))
        print(f"router layer CPU per request: {per * 1e6:.1f} us")
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(timeout=10)


if __name__ == "__main__":
    main()
