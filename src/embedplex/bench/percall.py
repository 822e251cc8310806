"""The app's CPU per request, driven in process with raw ASGI calls: no sockets, no client.

For counting instructions with callgrind, where wall clocks are useless on a shared machine::

    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=cg.%p \\
        python -m embedplex.bench.percall --requests 1024
    valgrind ... python -m embedplex.bench.percall --requests 3072

The difference between two run lengths, divided by the difference in requests, is the cost of
one request with start-up and loading taken out (docs/architecture.md, "Per-request CPU").
``--separate-threads`` writes one file per thread: the first is the event loop's. The fake
backend stands in for the model (the default model's tokenizer, real vector sizes), so what is
counted is the serving path, not inference. Garbage collection is off while it runs: it moves
with timing, not with the code.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.bench.inprocess import fake_gateway
from embedplex.bench.workload import TokenSpec, make_texts
from embedplex.config import Settings


async def _lifespan(app: Any) -> Callable[[], Awaitable[None]]:
    """Start the app's lifespan and wait for its models; returns what shuts it down."""
    started = asyncio.Event()
    queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    await queue.put({"type": "lifespan.startup"})

    async def receive() -> dict[str, str]:
        return await queue.get()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"] == "lifespan.startup.failed":
            raise RuntimeError(message.get("message", "startup failed"))

    task = asyncio.create_task(app({"type": "lifespan", "state": {}}, receive, send))
    await started.wait()
    await app.state.loader

    async def shutdown() -> None:
        await queue.put({"type": "lifespan.shutdown"})
        await task

    return shutdown


async def _call(app: Any, body: bytes, path: str) -> int:
    """One POST through the app; its status."""
    sent = False
    never = asyncio.get_running_loop().create_future()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await never  # type: ignore[no-any-return]

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"user-agent", b"embedplex-bench"),
        ],
        "state": {},
        "app": app,
    }
    await app(scope, receive, send)
    never.cancel()
    return status


def _callgrind(instrument: bool, *, on: bool = True) -> None:
    """Switch callgrind's instrumentation (started with ``--instr-atstart=no``) on or off, so
    that only the measured requests are counted: loading costs more than thousands of them."""
    if instrument:
        subprocess.run(
            ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
            check=True,
            stdout=subprocess.DEVNULL,
        )


class GcClock:
    """CPU seconds spent in garbage collections, and how many, while it is attached."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self.by_generation = [0.0, 0.0, 0.0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            took = time.thread_time() - self._began
            self.seconds += took
            self.by_generation[info["generation"]] += took
            self.collections[info["generation"]] += 1


async def drive(
    requests: int,
    callers: int,
    tokens: int,
    dim: int,
    dialect: str,
    *,
    instrument: bool = False,
    clock: GcClock | None = None,
    cache_max_bytes: int = 0,
) -> float:
    """Serve ``requests`` requests from ``callers`` concurrent callers; CPU seconds they took.

    With ``clock`` the collector stays on (as the app left it after loading) and is timed."""
    settings = Settings.load(None, log_requests=False, cache_max_bytes=cache_max_bytes)
    app = create_app(settings, gateway_factory=fake_gateway(FakeBackend(dim)))
    shutdown = await _lifespan(app)
    # Every request its own text: neither the cache nor in-flight dedupe may answer one.
    texts = make_texts(TokenSpec(tokens, tokens), requests + 2 * callers, seed=7)
    key = "input" if dialect == "openai" else "inputs"
    path = "/v1/embeddings" if dialect == "openai" else "/embed"
    bodies = [orjson.dumps({key: t}) for t in texts]
    left = requests

    async def caller(i: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status = await _call(app, bodies[2 * callers + left], path)
            if status != 200:
                raise RuntimeError(f"status {status}")

    for warm in range(2 * callers):  # first calls build caches; they are not counted apart
        await _call(app, bodies[warm % len(bodies)], path)
    gc.collect()
    if clock is None:
        gc.disable()
    else:
        gc.callbacks.append(clock)
    _callgrind(instrument)
    cpu = time.process_time()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    cpu = time.process_time() - cpu
    _callgrind(instrument, on=False)
    if clock is not None:
        gc.callbacks.remove(clock)
    gc.enable()
    await shutdown()
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=14)
    parser.add_argument("--dim", type=int, default=384, help="the fake vectors' size")
    parser.add_argument("--dialect", choices=("openai", "tei"), default="openai")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="under valgrind --tool=callgrind --instr-atstart=no: count only the requests",
    )
    parser.add_argument("--gc", action="store_true", help="keep the collector on; time it")
    parser.add_argument("--gen0", type=int, help="the collector's generation-0 threshold")
    parser.add_argument(
        "--cache-max-bytes", type=int, default=0, help="the embedding cache (0: off, as before)"
    )
    args = parser.parse_args()
    if args.gen0 is not None:
        gc.set_threshold(args.gen0, *gc.get_threshold()[1:])
    clock = GcClock() if args.gc else None
    cpu = uvloop.run(
        drive(
            args.requests,
            args.callers,
            args.tokens,
            args.dim,
            args.dialect,
            instrument=args.callgrind,
            clock=clock,
            cache_max_bytes=args.cache_max_bytes,
        )
    )
    print(f"{args.requests} requests, {cpu / args.requests * 1e6:.1f} us CPU per request")
    if clock is not None:
        print(
            f"garbage collection: {clock.seconds / args.requests * 1e6:.1f} us per request, "
            f"collections by generation {clock.collections} "
            f"(ms: {', '.join(f'{s * 1000:.1f}' for s in clock.by_generation)}; "
            f"thresholds {gc.get_threshold()})"
        )


if __name__ == "__main__":
    main()
