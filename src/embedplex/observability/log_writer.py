"""One writer thread that formats and writes log records in batches.

The stdlib ``QueueHandler``/``QueueListener`` pair wakes its thread for every record, and that
thread then formats it and makes a flushed write of its own. Under load that was one wake-up,
one write and one handover of the GIL per request line, and the event loop paid for the
handovers as much as the writer paid for the lines (docs/observability.md, "Logs"). Here a
record is appended to a deque (no lock, no wake-up while the writer has one due); the writer
wakes for the first record after a quiet spell, lets the others gather for ``pause`` seconds,
then formats them all and writes them with one write and one flush.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
import weakref
from collections import deque
from typing import TextIO

# Records waiting at most, about 70 MB of access-log records (1.4 KB each). The writer formats
# about 100,000 a second, so only a stalled stderr fills it: past it a record is counted and
# dropped, and the next batch says how many (``dropped_notice``).
LIMIT = 50_000
PAUSE_S = 0.05  # how long the writer lets records gather; a line is at most this much late
_CHUNK = 1_000  # records formatted into one write at most: bounds the text held at once
_ROUNDS = 3  # passes of one drain over records logged while it formats

# Every writer, for a forked child to disown the parent's writer thread.
_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


def _forked() -> None:
    for writer in list(_writers):
        writer.forked()


os.register_at_fork(after_in_child=_forked)


def _report(text: str) -> None:
    """A failure of the writer itself, where the log cannot be trusted: the real stderr."""
    with contextlib.suppress(Exception):
        sys.__stderr__.write(f"embedplex log writer: {text}\n")  # type: ignore[union-attr]


class BatchWriter:
    """Formats records with ``handler`` (its formatter, stream and terminator) in a thread."""

    def __init__(
        self, handler: logging.StreamHandler[TextIO], *, limit: int = LIMIT, pause: float = PAUSE_S
    ) -> None:
        self.handler = handler
        self.limit = limit
        self.pause = pause
        self.dropped = 0  # records refused while ``limit`` were waiting, since the start
        self._reported = 0
        self._records: deque[logging.LogRecord] = deque()
        self._new_locks()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="embedplex-log-writer", daemon=True
        )
        self._thread.start()
        _writers.add(self)

    def _new_locks(self) -> None:
        self._drop_lock = threading.Lock()  # dropping is rare; the counter must not lose one
        self._write_lock = threading.Lock()  # the writer's batches, and writes after ``stop``
        self._drainer: int | None = None  # the thread inside ``drain``
        self._due = threading.Event()  # records wait
        self._soon = threading.Event()  # cut the pause short: a warning or worse, or ``stop``

    def forked(self) -> None:
        """In a forked child: the writer thread is the parent's, and a lock may have been held
        at the fork. Fresh locks, and records are written by the thread that logs them; what
        was queued at the fork is the parent's to write (the child would write it again)."""
        self._new_locks()
        self._records.clear()
        self._thread = None

    def put(self, record: logging.LogRecord) -> None:
        """Queue ``record`` (any thread). After ``stop`` it is written at once, here."""
        if len(self._records) >= self.limit:
            with self._drop_lock:
                self.dropped += 1
            return
        self._records.append(record)
        # Appended, then checked: either the writer has not cleared ``_due`` since it was set
        # (its next drain sees this record), or we set it; so no record waits for a later one.
        if not self._due.is_set():
            self._due.set()
        if record.levelno >= logging.WARNING:
            self._soon.set()  # the lines that explain a crash must not wait out the pause
        # After ``stop``, written here; but not by a thread already draining (a formatter that
        # logs): it would wait on its own lock. Its drain writes the record before it returns.
        if self._thread is None and self._drainer != threading.get_ident():
            self.drain()

    def stop(self) -> None:
        """Write every queued record and end the thread; later records are written by ``put``."""
        thread = self._thread
        if thread is None:
            return
        self._thread = None  # the writer's cue to end, after one more drain
        self._due.set()
        self._soon.set()
        thread.join()
        self.drain()  # what came in after the thread's last drain

    def drain(self) -> None:
        """Write what is queued now, then the count of what was dropped, if any."""
        with self._write_lock:
            self._drainer = threading.get_ident()
            try:
                # Records logged while these are formatted (a formatter or an argument's
                # ``__str__`` that logs) are written by this drain too, a few rounds at most.
                for _ in range(_ROUNDS):
                    self._drain_once()
                    if not self._records:
                        break
            finally:
                self._drainer = None

    def _drain_once(self) -> None:
        batch: list[logging.LogRecord] = []
        pop = self._records.popleft
        while True:
            try:
                batch.append(pop())
            except IndexError:
                # A record is dropped only while ``limit`` wait: each drop counted by now
                # came after records that this drain has taken, so its line goes last.
                dropped = self.dropped - self._reported
                break
            if len(batch) == _CHUNK:
                self._write(batch)
                batch = []
        if dropped:
            self._reported += dropped
            batch.append(dropped_notice(dropped, self.limit))
        self._write(batch)

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            try:
                self.drain()
            except Exception:  # never die: the records would pile up unwritten
                _report(traceback.format_exc())
            if self._thread is None:  # stopped
                return
            self._soon.wait(self.pause)  # let records gather
            self._soon.clear()

    def _write(self, records: list[logging.LogRecord]) -> None:
        handler = self.handler
        lines = []
        written: list[logging.LogRecord] = []  # the formatted ones (the others are reported)
        for record in records:
            try:
                lines.append(handler.format(record))
                written.append(record)
            except Exception:
                handler.handleError(record)
        if not lines:
            return
        end = handler.terminator
        try:
            handler.stream.write(end.join(lines) + end)
            handler.flush()
        except OSError:
            # The file itself failed (a full non-blocking stderr, a full disk, a closed pipe):
            # reported once. What it took or buffered goes out later, so nothing is written a
            # second time; a line cut short stays cut (logging's own emit does the same).
            handler.handleError(written[-1])
        except Exception:
            # The stream refused the text (one line it cannot encode, a custom stream's
            # check): line by line, so only what it refuses is lost, each one reported.
            if getattr(handler.stream, "closed", False):
                handler.handleError(written[-1])  # closed: every line would say the same
                return
            for record, line in zip(written, lines, strict=True):
                try:
                    handler.stream.write(line + end)
                except Exception:
                    handler.handleError(record)
            try:
                handler.flush()
            except Exception:
                handler.handleError(written[-1])


def dropped_notice(count: int, limit: int) -> logging.LogRecord:
    """The line that says ``count`` records were dropped (after the records queued before)."""
    return logging.LogRecord(
        "embedplex.logs",
        logging.WARNING,
        __file__,
        0,
        "%d log records dropped: %d were waiting for the log writer (is stderr blocked?)",
        (count, limit),
        None,
    )


class BatchHandler(logging.Handler):
    """The root handler: hands each record to a ``BatchWriter`` as it is.

    No lock is taken per record (the deque is safe to append to from any thread), and nothing
    is formatted in the caller's thread, which for the access log is the event loop.
    """

    def __init__(self, writer: BatchWriter) -> None:
        super().__init__()
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filters and not self.filter(record):
            return False
        self.writer.put(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.writer.put(record)

    def flush(self) -> None:
        """What is queued, written now (``logging.shutdown``, a reconfiguration)."""
        self.writer.drain()
