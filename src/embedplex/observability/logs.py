"""Log setup: pretty (human) or JSON lines (machines)."""

from __future__ import annotations

import atexit
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from embedplex.core.errors import FatalBackendError
from embedplex.core.faults import fault
from embedplex.observability.log_writer import BatchHandler, BatchWriter

# Record attributes that are not extra fields. ``color_message`` is uvicorn's copy of its message
# with terminal colours in it, for its own formatter: in a JSON line it only repeats the message.
_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
# Libraries whose lines are noise at the server's level, or carry what a log must not hold: kept
# at WARNING (or the root's level, if higher). httpx logs every upstream request at INFO: one
# line per provider call is noise at load. huggingface_hub's own copy (httpx2) logs each hub
# request so, with its URL: userinfo in HF_ENDPOINT (a mirror's password) and all. Alembic names
# each plugin it sets up (7 lines at every start). aiosqlite logs two DEBUG lines per SQL
# statement with its parameters (a new key's argon2id hash, key names, usage rows), which the
# state store's ``hide_parameters`` keeps out of SQLAlchemy's own lines: at ``--log-level
# debug`` some 20 lines a second of an idle server's polling, and every hash it wrote.
QUIET_LOGGERS = ("httpx", "httpx2", "alembic.runtime.plugins", "aiosqlite")


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
    # Each control character is "not printable" (Unicode's Other and Separator classes, space
    # excepted): a printable text, nearly every line, is returned as it is, at a fraction of a
    # translate's cost.
    return text if text.isprintable() else text.translate(_PRETTY)


def _escape_traceback(text: str) -> str:
    """A traceback keeps its line breaks, each line indented: a line of it that a client wrote
    (an exception message quoting input) cannot pass for a log line of its own."""
    return "\n".join("  " + line for line in text.translate(_TRACEBACK).split("\n"))


class PrettyFormatter(logging.Formatter):
    """``time level logger: message``, with control characters escaped."""

    # (second, its text): lines come many to a second. One tuple, swapped whole, so a thread
    # that formats alongside the writer (``BatchWriter.put`` after ``stop``) reads a pair.
    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is None:  # the default adds milliseconds: not the same for a whole second
            return super().formatTime(record, datefmt)
        second = int(record.created)  # what the converter reads: strftime has no fractions
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, super().formatTime(record, datefmt))
        return cached[1]

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _escape_traceback(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _escape_traceback(super().formatStack(stack_info))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; no raw control character anywhere in it."""

    _second: tuple[int, str] = (-1, "")  # as PrettyFormatter's: the UTC second's text

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            cached = self._second = (second, text)
        data: dict[str, object] = {
            "ts": f"{cached[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        text = orjson.dumps(data, default=str).decode()
        # In a JSON text these characters can only be inside strings, where \uXXXX is theirs.
        # Each is "not printable" (see escape_controls): most lines need no translate.
        return text if text.isprintable() else text.translate(_JSON)


_writer: BatchWriter | None = None


def setup_logging(level: str = "info", fmt: str = "pretty") -> None:
    """Log through one writer thread that writes in batches (stopped, and so flushed, at exit)."""
    global _writer
    if _writer is not None:
        _writer.stop()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            PrettyFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    _writer = BatchWriter(handler)
    root = logging.getLogger()
    root.handlers[:] = [BatchHandler(_writer)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    quiet = max(root.level, logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    # A library's ``warnings.warn`` goes through the log (logger ``py.warnings``), in its format,
    # not as two raw lines on stderr between the JSON ones.
    logging.captureWarnings(True)
    if "transformers" in sys.modules:  # imported before the log was set up
        adopt_transformers_logging()


def adopt_transformers_logging() -> None:
    """Send transformers' records through this process's log and turn its progress bars off.

    transformers writes to stderr through a handler of its own, its records never reaching the
    root logger, and draws tqdm bars there as it loads weights: lines in neither log format
    (with raw terminal escapes: its load report of missing weights is a bold, multi-line table)
    among the JSON lines. Call it once transformers is imported (``load_transformers_model``);
    cheap, and harmless to call again."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def log_failure(log: logging.Logger, exc: BaseException, what: str, *args: object) -> None:
    """Log ``what`` failing at ERROR. A ``FatalBackendError`` (a path, a setting, a model's
    files, the hub: the operator's to fix) is one line ending in its reason, its traceback at
    DEBUG only (50-100 lines of where in the code it was found buried the one that said why),
    unless a fault in code caused it (``core/faults.py``: an ``AttributeError`` in a library
    that a loader wrapped); that, and anything else, is logged with its traceback."""
    if not isinstance(exc, FatalBackendError):
        log.error(what, *args, exc_info=exc)
    elif fault(exc) is not None:
        log.error(f"{what}: %s", *args, exc.message, exc_info=exc)
    else:
        log.error(f"{what}: %s", *args, exc.message)
        log.debug(what, *args, exc_info=exc)


def flush_logs() -> None:
    """Write every record still queued, now: before a last message printed straight to stderr
    (``serve/server.py``), which would otherwise land among, or inside, the log lines. Later
    records are written at once, by the thread that logs them: call it only on the way out."""
    _flush_at_exit()


@atexit.register
def _flush_at_exit() -> None:
    if _writer is not None:
        _writer.stop()
