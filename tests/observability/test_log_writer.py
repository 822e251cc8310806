"""The log writer thread: every record written, in order, in batches; none lost silently."""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import pytest

from embedplex.observability import logs
from embedplex.observability.log_writer import BatchHandler, BatchWriter

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class CountingStream(io.StringIO):
    """A stream that counts its writes; ``hold`` makes a write wait until it is released."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.writes += 1
        if self.hold:
            self.entered.set()
            self.release.wait(10)
        return super().write(text)


def writer(stream: CountingStream, **kwargs: float) -> BatchWriter:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    return BatchWriter(handler, **kwargs)  # type: ignore[arg-type]


def record(n: int) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, "line %d", (n,), None)


def test_records_are_written_in_order_in_one_write_per_batch() -> None:
    stream = CountingStream()
    w = writer(stream, pause=30)  # one batch: the first drain, then a long pause
    stream.hold = True
    w.put(record(0))
    assert stream.entered.wait(10)  # the writer is writing the first batch
    for n in range(1, 500):
        w.put(record(n))
    stream.hold = False
    stream.release.set()
    w.stop()  # no waiting out the pause: stop interrupts it and writes the rest
    assert stream.getvalue() == "".join(f"t INFO line {n}\n" for n in range(500))
    assert stream.writes == 2  # the first record, then the 499 that gathered meanwhile


def test_records_past_the_limit_are_counted_and_the_count_is_written() -> None:
    stream = CountingStream()
    w = writer(stream, limit=10, pause=30)
    stream.hold = True
    w.put(record(0))
    assert stream.entered.wait(10)  # the writer is stuck writing (a blocked stderr)
    for n in range(1, 26):
        w.put(record(n))
    assert w.dropped == 15  # 10 waiting, the next 15 refused
    stream.hold = False
    stream.release.set()
    w.stop()
    lines = stream.getvalue().splitlines()
    assert lines[:11] == [f"t INFO line {n}" for n in range(11)]
    assert lines[11:] == [
        "embedplex.logs WARNING 15 log records dropped: 10 were waiting for the log writer"
        " (is stderr blocked?)"
    ]
    w.put(record(99))  # after a notice, the count starts again: no second notice
    assert stream.getvalue().splitlines()[12:] == ["t INFO line 99"]


def test_a_record_after_stop_is_written_at_once() -> None:
    stream = CountingStream()
    w = writer(stream)
    w.stop()
    w.put(record(1))
    assert stream.getvalue() == "t INFO line 1\n"


def test_a_record_that_fails_to_format_does_not_lose_its_batch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = CountingStream()
    w = writer(stream, pause=30)
    stream.hold = True
    w.put(record(0))
    assert stream.entered.wait(10)
    w.put(logging.LogRecord("t", logging.INFO, __file__, 1, "%d", ("not a number",), None))
    w.put(record(2))
    stream.hold = False
    stream.release.set()
    w.stop()
    assert stream.getvalue() == "t INFO line 0\nt INFO line 2\n"
    assert "Logging error" in capsys.readouterr().err  # logging's own report of the bad one


def test_the_handler_applies_its_filters() -> None:
    stream = CountingStream()
    w = writer(stream)
    handler = BatchHandler(w)
    handler.addFilter(lambda r: r.args != (2,))
    for n in range(3):
        handler.handle(record(n))
    w.stop()
    assert stream.getvalue() == "t INFO line 0\nt INFO line 1\n"


def test_setup_logging_writes_every_line_and_flush_logs_writes_them_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = CountingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    root, access, httpx = (logging.getLogger(n) for n in ("", "uvicorn.access", "httpx"))
    saved = root.handlers[:], root.level, access.disabled, httpx.level
    try:
        logs.setup_logging("info", "pretty")
        log = logging.getLogger("embedplex.test")
        for n in range(2000):
            log.info("line %d", n)
        log.debug("not at info")
        logs.flush_logs()
        lines = stream.getvalue().splitlines()
        assert [line.split(": ", 1)[1] for line in lines] == [f"line {n}" for n in range(2000)]
        log.warning("after the flush")  # written at once, by this thread
        assert stream.getvalue().splitlines()[-1].endswith("embedplex.test: after the flush")
    finally:
        root.handlers[:], level, access.disabled, httpx_level = saved
        root.setLevel(level)
        httpx.setLevel(httpx_level)


class Loud:
    """An argument whose text logs a line of its own while it is formatted."""

    def __init__(self, put: BatchWriter) -> None:
        self.put = put

    def __str__(self) -> str:
        self.put.put(logging.LogRecord("t", logging.INFO, __file__, 1, "inner", (), None))
        return "loud"


def test_a_record_logged_while_another_is_formatted_is_written_and_hangs_nothing() -> None:
    """After ``stop`` the logging thread writes its own records; one logged while formatting
    (an argument's ``__str__`` that logs) used to wait on the lock its own thread held."""
    stream = CountingStream()
    w = writer(stream, pause=0)
    w.stop()
    done = threading.Event()

    def log() -> None:
        w.put(logging.LogRecord("t", logging.INFO, __file__, 1, "outer %s", (Loud(w),), None))
        done.set()

    threading.Thread(target=log, daemon=True).start()
    assert done.wait(10), "the logging thread hung on its own drain"
    assert stream.getvalue() == "t INFO outer loud\nt INFO inner\n"


def test_a_warning_does_not_wait_out_the_pause() -> None:
    stream = CountingStream()
    w = writer(stream, pause=30)
    w.put(record(0))  # the first drain, then the writer pauses for 30 s
    assert _eventually(lambda: "line 0" in stream.getvalue())
    w.put(record(1))
    w.put(logging.LogRecord("t", logging.WARNING, __file__, 1, "trouble", (), None))
    assert _eventually(lambda: "trouble" in stream.getvalue())  # long before the 30 s
    assert stream.getvalue().splitlines()[1:] == ["t INFO line 1", "t WARNING trouble"]
    w.stop()


class Fragile(logging.StreamHandler):  # type: ignore[type-arg]
    """Formatting fails while ``broken``, and so does reporting it (a closed stderr)."""

    broken = True

    def format(self, record: logging.LogRecord) -> str:
        if self.broken:
            raise ValueError("cannot format")
        return super().format(record)

    def handleError(self, record: logging.LogRecord) -> None:
        raise RuntimeError("stderr is closed")


def test_the_writer_survives_a_failure_of_its_own() -> None:
    stream = CountingStream()
    handler = Fragile(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    w = BatchWriter(handler, pause=0)
    w.put(record(0))
    assert _eventually(lambda: not w._records)
    handler.broken = False
    w.put(record(1))
    assert _eventually(lambda: "line 1" in stream.getvalue())  # the thread still runs
    w.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_writes_its_own_lines() -> None:
    read, write = os.pipe()
    handler = logging.StreamHandler(os.fdopen(write, "w"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    w = BatchWriter(handler, pause=30)
    w.put(logging.LogRecord("t", logging.INFO, __file__, 1, "parent", (), None))
    pid = os.fork()
    if pid == 0:  # the child: the parent's writer thread is not here
        w.put(logging.LogRecord("t", logging.INFO, __file__, 1, "child", (), None))
        os._exit(0)  # as multiprocessing's children end: no atexit, no flush_logs
    os.waitpid(pid, 0)
    w.stop()
    handler.stream.close()
    with os.fdopen(read) as lines:
        assert sorted(lines.read().split()) == ["child", "parent"]


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


class Gate(logging.Formatter):
    """Holds the writer in its first format until ``opened``: the records put meanwhile are
    written as one batch, after the first record's own."""

    def __init__(self) -> None:
        super().__init__("%(name)s %(levelname)s %(message)s")
        self.entered = threading.Event()
        self.opened = threading.Event()

    def format(self, record: logging.LogRecord) -> str:
        if not self.entered.is_set():
            self.entered.set()
            self.opened.wait(10)
        return super().format(record)


def write_in_two_batches(stream: TextIO, records: list[logging.LogRecord]) -> None:
    """The first of ``records`` in a batch of its own, the others in one batch after it."""
    handler = logging.StreamHandler(stream)
    gate = Gate()
    handler.setFormatter(gate)
    w = BatchWriter(handler, pause=30)
    w.put(records[0])
    assert gate.entered.wait(10)
    for each in records[1:]:
        w.put(each)
    gate.opened.set()
    w.stop()


class Refusing(io.StringIO):
    """A stream that refuses every write holding one line, as a file refuses text its
    encoding cannot hold (errors="strict")."""

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused

    def write(self, text: str) -> int:
        if self.refused in text:
            raise UnicodeEncodeError("ascii", text, 0, 1, "cannot write this")
        return super().write(text)


def test_a_line_the_stream_refuses_costs_that_line_not_its_batch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = Refusing("line 3\n")
    records = [record(n) for n in range(6)]
    records.insert(2, logging.LogRecord("t", logging.INFO, __file__, 1, "%d", ("nan",), None))
    write_in_two_batches(stream, records)
    assert stream.getvalue() == "".join(f"t INFO line {n}\n" for n in (0, 1, 2, 4, 5))
    err = capsys.readouterr().err
    # logging's reports: one of the line that could not be formatted, one of the refused line
    assert err.count("--- Logging error ---") == 2
    assert "Arguments: (3,)" in err


class FullPipe(io.RawIOBase):
    """The write end of a non-blocking pipe: takes ``room`` bytes, then would block once (as
    ``os.write`` on a full pipe: None), then takes everything (its reader caught up)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room: int | None = room
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: ReadableBuffer) -> int | None:
        data = bytes(b)
        if self.room is not None:
            if self.room == 0:
                self.room = None
                return None
            data = data[: self.room]
            self.room -= len(data)
        self.data += data
        return len(data)


def stderr_over(pipe: FullPipe, buffer_size: int) -> io.TextIOWrapper:
    """A text stream over ``pipe`` as ``sys.stderr`` is over its file: buffered, line by line."""
    buffered = io.BufferedWriter(pipe, buffer_size)
    return io.TextIOWrapper(
        buffered, encoding="utf-8", errors="backslashreplace", line_buffering=True
    )


def test_a_full_non_blocking_stream_costs_one_report_and_writes_nothing_twice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The pipe and the buffer take a part of the batch, cut inside a line (``BlockingIOError``
    with ``characters_written``): reported once, and what was taken is not written again
    (line by line after a partial write glued the rest of every line onto a cut one)."""
    pipe = FullPipe(room=17 + 50)  # the first batch (17 bytes), then 50 of the second
    records = [
        logging.LogRecord("t", logging.INFO, __file__, 1, "é line %d", (n,), None)
        for n in range(40)
    ]
    write_in_two_batches(stderr_over(pipe, 64), records)
    everything = "".join(f"t INFO é line {n}\n" for n in range(40)).encode()
    assert len(pipe.data) >= 17 + 50 and everything.startswith(bytes(pipe.data))
    assert capsys.readouterr().err.count("--- Logging error ---") == 1


def test_a_batch_its_stream_buffered_whole_is_not_written_twice() -> None:
    """A line-buffered file that buffers the whole batch and then cannot flush says it took
    none of it (``characters_written`` 0): not a reason to write the batch again."""
    pipe = FullPipe(room=17)  # the first batch, then the second is buffered and would block
    write_in_two_batches(stderr_over(pipe, 4096), [record(n) for n in range(40)])
    assert pipe.data.decode() == "".join(f"t INFO line {n}\n" for n in range(40))
