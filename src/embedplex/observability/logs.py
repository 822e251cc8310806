"""Log setup: pretty (human) or JSON lines (machines)."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _escapes(codes: Iterable[int], form: Callable[[int], str]) -> dict[int, str]:
    named = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
    return {c: named.get(c) or form(c) for c in codes}


# Log lines quote what clients send (paths, request ids, model names, error messages): a CR or
# LF there would forge a log line, an ANSI escape (ESC, or C1's CSI) would drive the terminal
# of whoever reads the log. So every control character is written escaped: C0, DEL, C1, and
# the Unicode line and paragraph separators that some viewers break lines at.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_PRETTY = _escapes(_CONTROLS, lambda c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
# JSON escapes C0 itself (orjson writes \n, \u001b); what it leaves raw is escaped as JSON.
_JSON = {c: f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), 0x2028, 0x2029)}
_TRACEBACK = {c: e for c, e in _PRETTY.items() if c != 0x0A}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return text.translate(_PRETTY)


def _escape_traceback(text: str) -> str:
    """A traceback keeps its line breaks, each line indented: a line of it that a client wrote
    (an exception message quoting input) cannot pass for a log line of its own."""
    return "\n".join("  " + line for line in text.translate(_TRACEBACK).split("\n"))


class PrettyFormatter(logging.Formatter):
    """``time level logger: message``, with control characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _escape_traceback(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _escape_traceback(super().formatStack(stack_info))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; no raw control character anywhere in it."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        # In a JSON text these characters can only be inside strings, where \uXXXX is theirs.
        return orjson.dumps(data, default=str).decode().translate(_JSON)


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are: formatting and the write happen there.

    The stdlib handler formats in the caller's thread; here that is the event loop, which would
    pay for every request's log line (a format and a flushed write to stderr each).
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


_listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str = "info", fmt: str = "pretty") -> None:
    """Log through a queue to one writer thread (stopped, and so flushed, at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            PrettyFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_QueueHandler(records)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every upstream request at INFO: one line per provider call is noise at load.
    logging.getLogger("httpx").setLevel(max(root.level, logging.WARNING))


def flush_logs() -> None:
    """Write every record still queued, now: before a last message printed straight to stderr
    (``serve/server.py``), which would otherwise land among, or inside, the log lines. Later
    records are not written: call it only on the way out."""
    global _listener
    _flush_at_exit()
    _listener = None


@atexit.register
def _flush_at_exit() -> None:
    if _listener is not None:
        _listener.stop()
