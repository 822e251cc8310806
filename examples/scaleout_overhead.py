"""What sharing state costs a gateway per request (docs/scale-out.md, "Measured overheads").

    PYTHONPATH=src python examples/scaleout_overhead.py \
        [--pg postgresql://postgres@127.0.0.1:5432/test] [--requests 2000]

Starts one ``embedplex serve`` (``local_model = false``: one remote route to
``embedplex.bench.echo_server``, an upstream that does no work, so the gateway's own cost is
what is measured; ``max_wait_ms = 0``: no wait for company) in four set-ups, one after the other:

- open: no keys, the default SQLite store, no Redis;
- key, local limits: every request with a managed key that has an rpm limit, SQLite store,
  limits counted in the process;
- key in PostgreSQL, local limits: the store shared, the limits not;
- key, shared state: the same key in PostgreSQL (a fresh schema, dropped afterwards) and its
  limits in Redis (a ``redis-server`` this script starts on a free port), as replicas run.

For each, it sends ``--requests`` sequential requests on one keep-alive connection (after 200
warm-up ones) and reports the server process's CPU time per request (user + system, from
/proc: what another replica or the load balancer does not change) and the client's p50 latency.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

ADMIN = "overhead-admin-secret"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(url)


@contextlib.contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process(args) as proc:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def pg_schema(base: str) -> Iterator[str]:
    import asyncpg

    schema = f"overhead_{uuid.uuid4().hex[:12]}"

    async def drop() -> None:
        conn = await asyncpg.connect(base.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    try:
        yield f"{base}?schema={schema}"
    finally:
        asyncio.run(drop())


def measure(name: str, config: Path, workdir: Path, requests: int, key: bool, **env: str) -> None:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    full.update(
        EMBEDPLEX_ADMIN_SECRET=ADMIN,
        EMBEDPLEX_DATA_DIR=str(workdir / name.replace(" ", "-").replace(",", "")),
        EMBEDPLEX_LOG_REQUESTS="false",
        **env,
    )
    serve = [sys.executable, "-m", "embedplex", "serve", "--config", str(config)]
    with process([*serve, "--port", str(port)], full) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health/ready", proc)
        headers = {}
        if key:
            r = httpx.post(
                base + "/api/v1/keys",
                json={"name": "bench", "rpm": 1_000_000},
                headers={"authorization": f"Bearer {ADMIN}"},
                timeout=10,
            )
            r.raise_for_status()
            headers["authorization"] = f"Bearer {r.json()['key']}"
        body = {"input": "the quick brown fox", "model": "remote"}
        with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
            for _ in range(200):
                client.post("/v1/embeddings", json=body).raise_for_status()
            latencies = []
            before = cpu_seconds(proc.pid)
            for _ in range(requests):
                start = time.perf_counter()
                client.post("/v1/embeddings", json=body).raise_for_status()
                latencies.append(time.perf_counter() - start)
            spent = cpu_seconds(proc.pid) - before
    p50 = statistics.median(latencies) * 1000
    print(f"| {name} | {spent / requests * 1e6:,.0f} µs | {p50:.2f} ms |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    upstream_port = free_port()
    with (
        tempfile.TemporaryDirectory() as tmp,
        process([sys.executable, "-m", "embedplex.bench.echo_server", str(upstream_port)]),
    ):
        workdir = Path(tmp)
        config = workdir / "gateway.toml"
        config.write_text(
            "local_model = false\n\n[[providers]]\n"
            f'name = "echo"\ntype = "openai"\nendpoint = "http://127.0.0.1:{upstream_port}"\n'
            'model = "echo"\nmax_wait_ms = 0\n\n'
            '[[routes]]\nmodel = "remote"\nproviders = ["echo"]\n'
        )
        print("| set-up | server CPU per request | p50 (1 client) |")
        print("|---|---|---|")
        measure("open", config, workdir, args.requests, key=False)
        measure("key, local limits", config, workdir, args.requests, key=True)
        with pg_schema(args.pg) as state_url:
            measure(
                "key in PostgreSQL, local limits",
                config,
                workdir,
                args.requests,
                key=True,
                EMBEDPLEX_STATE_URL=state_url,
            )
        with redis_server() as redis_url, pg_schema(args.pg) as state_url:
            measure(
                "key, PostgreSQL + Redis",
                config,
                workdir,
                args.requests,
                key=True,
                EMBEDPLEX_STATE_URL=state_url,
                EMBEDPLEX_REDIS_URL=redis_url,
            )


if __name__ == "__main__":
    main()
