"""Real server processes for the reliability suite: the fake-backend server and ``embedplex serve``.

Every scenario here drives a process over TCP on 127.0.0.1, as a client in production would:
signals, listener closing and connection handling are the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import free_port, stop, wait_ready

HERE = Path(__file__).parent

# ``make reliability`` sets RELIABILITY_SCALE=full: more examples, more clients, the real model.
FULL = os.environ.get("RELIABILITY_SCALE") == "full"


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path  # stdout and stderr: a file, so that a chatty server never blocks on a pipe

    def output(self) -> str:
        """What the process has printed so far."""
        return self.log.read_text(errors="replace")


def _env(cache: Path | None, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    src = str(HERE.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    if cache is not None:
        env["EMBEDPLEX_CACHE_DIR"] = str(cache)
    # A state store of its own: keys the fuzzer creates on one server must not reach another
    # (or the developer's own store under ~/.local/share).
    env["EMBEDPLEX_DATA_DIR"] = tempfile.mkdtemp(prefix="embedplex-data-")
    env.update(extra or {})
    return env


@contextmanager
def process(
    cmd: list[str], env: dict[str, str], port: int, *, ready: bool = True
) -> Iterator[Server]:
    """Start ``cmd``; wait for readiness; on exit SIGTERM it (kill if it will not stop)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        srv = Server(proc, f"http://127.0.0.1:{port}", port, log)
        try:
            if ready:
                try:
                    wait_ready(proc, srv.url, timeout=240)
                except (AssertionError, TimeoutError) as exc:
                    raise AssertionError(f"{exc}\n{srv.output()[-3000:]}") from None
            yield srv
        finally:
            stop(proc, grace=60, kill_wait=30)


@contextmanager
def fake_server(
    model_dir: Path,
    *,
    backend: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    ready: bool = True,
    **settings: Any,
) -> Iterator[Server]:
    """The real server (``serve.server.serve``) over a ``FakeBackend`` (``fake_server.py``).

    ``settings`` are ``Settings`` fields; ``env`` adds environment variables (secrets go there,
    as an operator would pass them).
    """
    port = free_port()
    spec = {
        "model_dir": str(model_dir),
        "backend": backend or {},
        "settings": {"host": "127.0.0.1", "port": port, **settings},
    }
    cmd = [sys.executable, str(HERE / "fake_server.py"), json.dumps(spec)]
    with process(cmd, _env(None, env), port, ready=ready) as srv:
        yield srv


@contextmanager
def embedplex_serve(
    *args: str, cache: Path | None = None, env: dict[str, str] | None = None, ready: bool = True
) -> Iterator[Server]:
    """``embedplex serve`` itself, as an operator starts it."""
    port = free_port()
    cmd = [sys.executable, "-m", "embedplex", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with process([*cmd, *args], _env(cache, env), port, ready=ready) as srv:
        yield srv


def record(scenario: str, **figures: object) -> None:
    """Append a scenario's figures to ``$RELIABILITY_REPORT`` (JSON lines) when it is set.

    ``make reliability`` sets it; docs/reliability.md quotes one such run.
    """
    path = os.environ.get("RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"scenario": scenario, "full": FULL, **figures}) + "\n")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
