"""Log records for a hot call site, made without ``logging``'s per-record lookups.

``Logger.info`` looks up its caller (a walk up the stack with a path normalized per frame), the
thread's name and the process's name, and splits the file name, for every record: about half of
what one access-log line cost the event loop. A ``LogSite`` is one call site that logs one
message at one level: it makes its first record in each thread the usual way, keeps that
record's attributes, and makes the next ones by copying them and setting what changes (the time,
the arguments, the extra fields). The records are ``logging.LogRecord``s with every attribute
the usual way gives, and they go through ``Logger.handle``: the logger's level, filters,
handlers and propagation apply as for any record.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

_new_record = logging.LogRecord.__new__


def _task_name() -> str | None:
    """The current asyncio task's name, as ``LogRecord`` finds it (Python 3.12 on)."""
    if not getattr(logging, "logAsyncioTasks", False):
        return None
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        name: str = asyncio.current_task().get_name()
    except Exception:  # no running loop, or no task: as LogRecord, none
        return None
    return name


class _Prototypes(threading.local):
    """Per thread: each site's first record's attributes (thread id and name are per thread)."""

    def __init__(self) -> None:
        self.by_site: dict[LogSite, dict[str, Any]] = {}


_prototypes = _Prototypes()


def _forget_prototypes() -> None:
    # A forked child is another process: its records must carry its own pid.
    global _prototypes
    _prototypes = _Prototypes()


os.register_at_fork(after_in_child=_forget_prototypes)


class LogSite:
    """``logger.log(level, msg, *args, extra=fields)`` from one place, made cheaply."""

    def __init__(self, logger: logging.Logger, level: int, msg: str) -> None:
        self.logger = logger
        self.level = level
        self.msg = msg

    def log(self, args: tuple[object, ...], fields: dict[str, object]) -> None:
        """Log ``msg % args`` with ``fields`` as the record's extra attributes.

        ``args`` must not be a single mapping (``LogRecord`` would unwrap it), and ``fields``
        must not name a record attribute (``extra`` refuses that too).
        """
        logger = self.logger
        if not logger.isEnabledFor(self.level):
            return
        if logging.getLogRecordFactory() is not logging.LogRecord:
            # An operator's record factory: every record must be its own.
            logger.log(self.level, self.msg, *args, extra=fields, stacklevel=2)
            return
        proto = _prototypes.by_site.get(self)
        if proto is None:
            proto = self._prototype()
        ns = time.time_ns()
        created = ns / 1e9
        record = _new_record(logging.LogRecord)
        attrs = record.__dict__
        attrs.update(proto)
        attrs.update(fields)
        attrs["args"] = args
        attrs["created"] = created
        attrs["msecs"] = (ns % 1_000_000_000) // 1_000_000 + 0.0
        attrs["relativeCreated"] = proto["relativeCreated"] + (created - proto["created"]) * 1000
        if "taskName" in proto:  # Python 3.12 on: the asyncio task, which is each record's own
            attrs["taskName"] = _task_name()
        logger.handle(record)

    def _prototype(self) -> dict[str, Any]:
        """This thread's first record from the site, made as ``Logger.log`` makes it: its
        caller (the site's caller, two frames up), thread and process are the site's from now
        on."""
        caller = sys._getframe(2)  # what findCaller finds: the frame that called ``log``
        code, line = caller.f_code, caller.f_lineno
        logger = self.logger
        record = logger.makeRecord(
            logger.name, self.level, code.co_filename, line, self.msg, (), None, code.co_name
        )
        proto = dict(record.__dict__)
        _prototypes.by_site[self] = proto
        return proto
