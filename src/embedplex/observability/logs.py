"""Log setup: pretty (human) or JSON lines (machines)."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time

import orjson

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
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
        return orjson.dumps(data, default=str).decode()


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
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
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
