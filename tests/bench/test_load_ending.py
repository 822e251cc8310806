"""How a ``bench load`` run ends: a stuck request past the duration, Ctrl-C, a server that is
not there, and the exit status of a run in which nothing (or not everything) succeeded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from embedplex.backends.fake import FakeBackend
from embedplex.bench.load import LoadOptions, grace_s, run_load
from embedplex.cli.main import app

ServerFactory = Callable[..., Any]

SRC = Path(__file__).resolve().parents[2] / "src"


async def test_a_stuck_request_is_cut_after_the_grace_and_does_not_stretch_the_run(
    recording: Any,
) -> None:
    with recording(hold_at=10) as srv:
        options = LoadOptions(url=srv.url, duration=1.0, concurrency=4, timeout=20.0)
        began = time.perf_counter()
        result = await run_load(options)
        wall = time.perf_counter() - began
    assert grace_s(options) == 1.0
    assert result.unfinished == 1  # the held one: neither answered nor failed
    assert (result.fail, result.ok) == (0, result.requests)
    assert wall < 1.0 + grace_s(options) + 2.0  # not the 20 s timeout
    # the run's time ends with the last answer, not with the cancelled request
    assert 1.0 <= result.elapsed_s < 1.5
    assert result.req_per_s == pytest.approx(result.ok / result.elapsed_s)
    assert "unfinished x 1" in result.failure_note()
    assert result.to_json()["unfinished"] == 1


async def test_strict_exits_1_when_a_request_went_unanswered(recording: Any) -> None:
    """A server that hangs one request fails a --strict run (examples/c64_ratio.sh relies on
    it), though the cut request counts as unfinished, not failed."""
    with recording(hold_at=10) as srv:
        args = ["bench", "load", "--url", srv.url, "--duration", "1", "--concurrency", "4"]
        out = await asyncio.to_thread(
            CliRunner().invoke, app, [*args, "--timeout", "20", "--strict"]
        )
    assert out.exit_code == 1, out.output
    assert "1 of" in out.output and "requests failed" in out.output


def test_the_grace_is_a_tenth_of_a_long_run() -> None:
    url = "http://127.0.0.1:9"
    assert grace_s(LoadOptions(url=url, duration=30)) == 3.0
    assert grace_s(LoadOptions(url=url, duration=3)) == 1.0
    assert grace_s(LoadOptions(url=url, requests=5)) == 0.0


@contextmanager
def _port_refusing() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        yield sock.getsockname()[1]


def test_a_server_that_is_not_there_is_one_line_and_exit_2() -> None:
    with _port_refusing() as port:
        out = CliRunner().invoke(
            app, ["bench", "load", "--url", f"http://127.0.0.1:{port}", "--requests", "3"]
        )
    assert out.exit_code == 2, out.output
    [line] = out.output.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: cannot connect to http://127.0.0.1:{port}: ")
    assert out.exception is None or isinstance(out.exception, SystemExit)


def test_dedupe_against_nothing_is_exit_2_too() -> None:
    with _port_refusing() as port:
        out = CliRunner().invoke(
            app, ["bench", "dedupe", "--url", f"http://127.0.0.1:{port}", "--rounds", "1"]
        )
    assert out.exit_code == 2, out.output
    assert "cannot connect to" in out.output


async def test_a_run_with_no_success_exits_1(server: ServerFactory, tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    async with server(FakeBackend(dim=8)) as url:
        args = ["bench", "load", "--url", f"{url}/no/such/path", "--requests", "8"]
        out = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--json", str(target)])
    assert out.exit_code == 1, out.output
    assert "error: no request succeeded (404 x 8)" in out.output
    assert "| embedplex " in out.output  # the table is still printed
    assert json.loads(target.read_text())["fail"] == 8


async def test_strict_exits_1_when_any_request_failed(server: ServerFactory) -> None:
    backend = FakeBackend(dim=8, delay=0.05)
    async with server(backend, max_concurrent_requests=1) as url:
        args = ["bench", "load", "--url", url, "--requests", "20", "--concurrency", "4"]
        lenient = await asyncio.to_thread(CliRunner().invoke, app, args)
        strict = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--strict"])
    assert lenient.exit_code == 0, lenient.output  # 429s measured, some answers: a result
    assert "429 x" in lenient.output
    assert strict.exit_code == 1, strict.output
    assert "requests failed" in strict.output


def _load_process(url: str, *args: str) -> subprocess.Popen[str]:
    """``embedplex bench load`` in a process of its own, Ctrl-C handled as in a terminal."""
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from embedplex.cli.main import main; main()"
    )
    cmd = [sys.executable, "-c", code, "bench", "load", "--url", url, *args]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _interrupt_when(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> tuple[str, str]:
    deadline = time.monotonic() + 30
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the load never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=30)


@pytest.mark.parametrize(
    ("args", "said", "table"),
    [
        (("--duration", "60"), "interrupted: the figures above cover the run until Ctrl-C", True),
        (
            ("--requests", "10", "--warmup", "10000000"),
            "interrupted before the measured run",
            False,
        ),
    ],
    ids=["measuring", "warming-up"],
)
def test_ctrl_c_exits_130_with_what_was_measured(
    recording: Any, args: tuple[str, ...], said: str, table: bool
) -> None:
    with recording() as srv:
        proc = _load_process(srv.url, "--concurrency", "8", *args)
        out, err = _interrupt_when(proc, lambda: len(srv.texts) > 200)
    assert proc.returncode == 130, err
    assert said in err
    assert ("| embedplex " in out) is table
    assert "never retrieved" not in err
    assert "Traceback" not in err
