"""Blocking work run in a child interpreter (``python -m embedplex.backends.<module>``): the ONNX
export (``onnx_export.py``) and the hub download (``hub.py``).

A child can be killed, a thread cannot: a child that outlives its time is killed with all its
threads and sockets, and one whose server went away (Ctrl-C, SIGTERM, even SIGKILL) ends itself
when its stdin closes (``exit_with_parent``), so nothing it started keeps the server's process
alive. Its log lines (``LOG_FORMAT`` on its stderr) become records of the server's own log.

Exit status: 0 done; 2 refused (a ``FatalBackendError``: its message is the child's last ERROR
line); 1 any other failure (an ERROR line names it).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import embedplex
from embedplex.core.redact import redact_urls

# The child's log lines on stderr, which the server parses back into records.
LOG_FORMAT = logging.BASIC_FORMAT  # "LEVEL:logger:message"
REFUSED = 2  # the exit status of a FatalBackendError
_TAIL_LINES = 20  # of the child's output, kept for the error when it fails
_REASON_CHARS = 600
_LEVELS = logging.getLevelNamesMapping()


@dataclass(frozen=True, slots=True)
class ChildExit:
    """How a child ended: ``code`` None when it outlived its time and was killed; ``reason``
    its last ERROR line, else its last line of output (URL credentials masked)."""

    code: int | None
    reason: str

    def status(self) -> str:
        """ "exit code -9, SIGKILL" (the OOM killer sends SIGKILL)."""
        code = self.code
        status = f"exit code {code}"
        if code is not None and -code in signal.valid_signals():
            status += f", {signal.Signals(-code).name}"
        return status


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its settings (and their secrets: the child reads
    none), with this process's embedplex first on the path so that both run the same code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    package_root = str(Path(embedplex.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env | (extra or {})


def run_child(
    command: list[str],
    *,
    timeout: float,
    log: logging.Logger,
    label: str,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> ChildExit:
    """Run a child to its end (killed after ``timeout`` s), relaying its log to ``log``, each
    line after ``label``; ``pass_fds``: descriptors it inherits."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,  # closed when this process ends: the child's cue to exit
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env or child_env(),
        text=True,
        errors="replace",
        pass_fds=pass_fds,
    )
    relay = _Relay(proc.stdout, log, label)  # type: ignore[arg-type]
    relay.start()
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:  # timed out, or this thread was interrupted
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        relay.join(10)  # output ends with the child, unless a grandchild holds the pipe
        if proc.stdout is not None and not relay.is_alive():
            proc.stdout.close()
    return ChildExit(code, relay.reason())


class _Relay(threading.Thread):
    """Reads the child's output: each ``LEVEL:logger:message`` line becomes a record of this
    process's log at that level; other lines (tracebacks, output before logging is set up)
    continue the previous record's level, WARNING before any. URL credentials are masked
    (``HF_ENDPOINT`` may carry them, and the hub's messages quote its URLs)."""

    def __init__(self, stream: IO[str], log: logging.Logger, label: str) -> None:
        super().__init__(name=f"{label} log", daemon=True)
        self._stream = stream
        self._log = log
        self._label = label
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.last_error: str | None = None

    def run(self) -> None:
        level = logging.WARNING
        for raw in self._stream:
            line = redact_urls(raw.rstrip())
            if not line:
                continue
            name, sep, rest = line.partition(":")
            if sep and name in _LEVELS:
                level, line = _LEVELS[name], rest  # rest: "logger:message"
                if level >= logging.ERROR:
                    self.last_error = rest.partition(":")[2]
            self._log.log(level, "%s: %s", self._label, line)
            self.tail.append(line)

    def reason(self) -> str:
        text = self.last_error or (self.tail[-1] if self.tail else "no output")
        return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def exit_with_parent() -> None:
    """In the child: end this process when the server goes (its end closes our stdin: EOF,
    even on SIGKILL); an orphan would only work for a result nobody reads."""

    def watch() -> None:
        # The raw descriptor: a daemon thread blocked inside sys.stdin's buffer would hold its
        # lock at interpreter shutdown, which aborts the process.
        while os.read(0, 1 << 12):
            pass
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def child_logging() -> None:
    """In the child: log lines the server's relay reads, on stderr."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    logging.captureWarnings(True)
