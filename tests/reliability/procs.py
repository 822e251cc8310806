"""Real server processes for the reliability suite: the fake-backend server and ``embedplex serve``.

Every scenario here drives a process over TCP on 127.0.0.1, as a client in production would:
signals, listener closing and connection handling are the real ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import free_port, wait_ready

HERE = Path(__file__).parent

# ``make reliability`` sets RELIABILITY_SCALE=full: more examples, more clients, the real model.
FULL = os.environ.get("RELIABILITY_SCALE") == "full"


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    port: int

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def output(self) -> str:
        """What the process printed (read once it has exited)."""
        if self.proc.stdout is None:
            return ""
        return self.proc.stdout.read()


def _env(cache: Path | None, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    src = str(HERE.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    if cache is not None:
        env["EMBEDPLEX_CACHE_DIR"] = str(cache)
    env.update(extra or {})
    return env


@contextmanager
def process(
    cmd: list[str], env: dict[str, str], port: int, *, ready: bool = True
) -> Iterator[Server]:
    """Start ``cmd``; wait for readiness; on exit SIGTERM it (kill if it will not stop)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    srv = Server(proc, f"http://127.0.0.1:{port}", port)
    try:
        if ready:
            wait_ready(proc, srv.url, timeout=240)
        yield srv
    finally:
        srv.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def fake_server(
    model_dir: Path,
    *,
    backend: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
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
    with process(cmd, _env(None, env), port) as srv:
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
