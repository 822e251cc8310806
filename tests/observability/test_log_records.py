"""``LogSite``'s records are the records ``Logger.log`` makes, and go where its records go."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from embedplex.observability.log_records import LogSite
from embedplex.observability.logs import JsonFormatter, PrettyFormatter

ARGS = ("POST", "/embed", 200)
FIELDS = {"route": "/embed", "status": 200, "error_type": None}


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, Collect]]:
    log = logging.getLogger("embedplex.test.site")
    handler = Collect()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # The stdlib's factory, whatever an earlier test imported: Ray, once imported, installs its
    # own (records with a ``_ray_timestamp_ns``), and then a site makes its records the usual
    # way (``test_an_operators_record_factory_makes_every_record``), not the way under test here.
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    yield log, handler
    logging.setLogRecordFactory(factory)
    log.removeHandler(handler)
    log.filters.clear()
    log.setLevel(logging.NOTSET)


def both(log: logging.Logger, site: LogSite) -> None:
    """One record each way, from the same function."""
    site.log(ARGS, dict(FIELDS))
    log.info("%s %s %d", *ARGS, extra=dict(FIELDS))


TIMES = {"created", "msecs", "relativeCreated"}


def assert_same(ours: logging.LogRecord, theirs: logging.LogRecord) -> None:
    a, b = dict(ours.__dict__), dict(theirs.__dict__)
    assert list(a) == list(b)  # the same attributes, in the same order (JSON keeps it)
    assert b.pop("lineno") == a.pop("lineno") + 1  # the next line of ``both``
    assert {k: v for k, v in a.items() if k not in TIMES} == {
        k: v for k, v in b.items() if k not in TIMES
    }
    assert 0 <= b["created"] - a["created"] < 1
    assert a["msecs"] == pytest.approx(a["created"] % 1 * 1000, abs=1)
    assert b["relativeCreated"] - a["relativeCreated"] == pytest.approx(
        (b["created"] - a["created"]) * 1000, abs=1
    )


def test_records_are_those_logger_log_makes(logger: tuple[logging.Logger, Collect]) -> None:
    log, handler = logger
    site = LogSite(log, logging.INFO, "%s %s %d")
    for _ in range(2):  # the first record makes the prototype; the second copies it
        both(log, site)
    assert len(handler.records) == 4
    for ours, theirs in zip(handler.records[::2], handler.records[1::2], strict=True):
        assert_same(ours, theirs)
        assert ours.funcName == "both" and ours.pathname == __file__
        assert ours.getMessage() == "POST /embed 200"
    pretty = PrettyFormatter("%(levelname)s %(name)s: %(message)s")
    assert pretty.format(handler.records[2]) == pretty.format(handler.records[3])


def test_each_thread_gets_its_own_thread_name(logger: tuple[logging.Logger, Collect]) -> None:
    log, handler = logger
    site = LogSite(log, logging.INFO, "%s %s %d")
    site.log(ARGS, {})
    worker = threading.Thread(target=site.log, args=(ARGS, {}), name="other-thread")
    worker.start()
    worker.join()
    main, other = handler.records
    assert (main.threadName, other.threadName) == (threading.current_thread().name, "other-thread")
    assert other.thread == worker.ident


def test_level_filters_and_disabled_apply(logger: tuple[logging.Logger, Collect]) -> None:
    log, handler = logger
    site = LogSite(log, logging.INFO, "%s %s %d")
    log.setLevel(logging.WARNING)
    site.log(ARGS, {})
    log.setLevel(logging.INFO)
    log.addFilter(lambda r: r.args != ARGS)
    site.log(ARGS, {})
    site.log(("GET", "/x", 404), {})
    assert [r.getMessage() for r in handler.records] == ["GET /x 404"]


def test_an_operators_record_factory_makes_every_record(
    logger: tuple[logging.Logger, Collect],
) -> None:
    log, handler = logger
    site = LogSite(log, logging.INFO, "%s %s %d")
    site.log(ARGS, {})  # a prototype made before the factory changed is not used after
    made = logging.getLogRecordFactory()

    def tagged(*args: object, **kwargs: object) -> logging.LogRecord:
        record = made(*args, **kwargs)
        record.tag = "mine"
        return record

    logging.setLogRecordFactory(tagged)
    try:
        both(log, site)
    finally:
        logging.setLogRecordFactory(made)
    first, ours, theirs = handler.records
    assert not hasattr(first, "tag")
    assert_same(ours, theirs)
    assert ours.__dict__["tag"] == "mine" and ours.__dict__["status"] == 200


def test_json_line_matches_logger_log(logger: tuple[logging.Logger, Collect]) -> None:
    log, handler = logger
    site = LogSite(log, logging.INFO, "%s %s %d")
    both(log, site)
    ours, theirs = handler.records
    ours.created, ours.msecs = theirs.created, theirs.msecs
    assert JsonFormatter().format(ours) == JsonFormatter().format(theirs)
