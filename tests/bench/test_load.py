"""``bench load`` against a real in-process server with the fake backend: a handful of requests.

No timing assertions: timing belongs in the benchmark, not in tests.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from embedplex.backends.fake import FakeBackend
from embedplex.bench.client import CannotConnectError
from embedplex.bench.load import LoadOptions, run_load
from embedplex.bench.workload import TokenSpec
from embedplex.cli.main import app

ServerFactory = Callable[..., Any]


@pytest.mark.parametrize("dialect", ["openai", "tei"])
async def test_load_counts_every_answer(server: ServerFactory, dialect: str) -> None:
    backend = FakeBackend(dim=384)
    async with server(backend, cache_max_bytes=0) as url:  # the load cycles its bodies
        seen: list[int] = []
        result = await run_load(
            LoadOptions(
                url=url,
                dialect=dialect,
                requests=24,
                duration=30,
                concurrency=4,
                tokens=TokenSpec(5, 40),
                inputs_per_request=2,
                warmup=4,
            ),
            progress=lambda done, _: seen.append(done),
        )
    assert (result.requests, result.ok, result.fail) == (24, 24, 0)
    assert result.inputs_per_request == 2
    assert result.p50_ms > 0
    assert seen[-1] == 24
    # warm-up plus measured requests, two inputs each, all reached the backend
    assert sum(size for size, _ in backend.batches) == (24 + 4) * 2


async def test_load_counts_refusals_apart(server: ServerFactory) -> None:
    backend = FakeBackend(dim=8, delay=0.05)
    async with server(backend, max_concurrent_requests=1) as url:
        result = await run_load(
            LoadOptions(url=url, requests=30, duration=30, concurrency=4, refusal_pause=0.001)
        )
    assert result.requests == 30
    assert result.ok >= 1
    assert result.status_429 > 0
    assert result.ok + result.status_429 == 30
    assert result.refused_p99_ms > 0


async def test_load_against_nothing_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(CannotConnectError, match=f"cannot connect to http://127.0.0.1:{port}"):
            await run_load(LoadOptions(url=f"http://127.0.0.1:{port}", requests=3))


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="requests or --duration"):
        LoadOptions(url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="dialect"):
        LoadOptions(url="http://127.0.0.1:1", requests=1, dialect="grpc")
    with pytest.raises(ValueError, match="url"):
        LoadOptions(url="https://example.com", requests=1)


def test_cli_rejects_bad_tokens() -> None:
    out = CliRunner().invoke(app, ["bench", "load", "--tokens", "x-y", "--requests", "1"])
    assert out.exit_code != 0
    assert "tokens" in out.output


async def test_cli_json_output(server: ServerFactory, tmp_path: Path) -> None:
    import asyncio

    backend = FakeBackend(dim=8)
    async with server(backend) as url:
        target = tmp_path / "r.json"
        args = ["bench", "load", "--url", url, "--requests", "6", "--concurrency", "2"]
        out = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--json", str(target)])
    assert out.exit_code == 0, out.output
    assert "| setup" in out.output
    data = json.loads(target.read_text())
    assert data["ok"] == 6
    assert data["concurrency"] == 2
