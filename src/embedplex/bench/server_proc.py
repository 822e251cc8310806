"""Start ``embedplex serve`` as a child process on 127.0.0.1, time its start, read its memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

_LAUNCH = "from embedplex.cli.main import main; main()"
_PRIVATE_FLAGS = ("--host", "--port", "--cache-dir", "--log-level")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``with ServerProcess(args, log=...) as srv``: started, ready, stopped (SIGTERM) on exit.

    ``ready_s`` is process start to ``/health/ready`` answering 200: the cold start.
    """

    def __init__(
        self,
        args: list[str],
        *,
        log: Path,
        ready_timeout: float = 600.0,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log = log
        self.env = env
        self.ready_timeout = ready_timeout
        self.ready_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> str:
        """The command line as a user would type it (without the suite's port and cache dir)."""
        shown: list[str] = []
        skip = False
        for arg in self.args:
            if skip:
                skip = False
            elif arg in _PRIVATE_FLAGS:
                skip = True
            else:
                shown.append(arg)
        return " ".join(["embedplex", *shown])

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            start = time.perf_counter()
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env} if self.env else None,
            )
        deadline = start + self.ready_timeout
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self._proc.returncode}; see {self.log}"
                    )
                try:
                    if client.get(f"{self.url}/health/ready").status_code == 200:
                        self.ready_s = time.perf_counter() - start
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"server not ready within {self.ready_timeout:.0f}s; see {self.log}")

    def rss_mb(self) -> tuple[float, float]:
        """Current and peak resident memory (VmRSS, VmHWM) in MB; zeros where unreadable."""
        if self._proc is None:
            return 0.0, 0.0
        values = {"VmRSS": 0.0, "VmHWM": 0.0}
        try:
            for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) / 1024
        except OSError:
            pass
        return values["VmRSS"], values["VmHWM"]

    def stop(self, grace: float = 30.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
