"""Libraries' lines go through the server's log, in its format, and carry no secret.

Review of a real ``embedplex serve --log-format json``: ``--log-level debug`` wrote every SQL
statement of the state store with its parameters (a new key's argon2id hash among them) through
aiosqlite's own DEBUG lines; the torch backend's weight loading drew transformers' progress bar
and its load report (a bold multi-line table, through a stderr handler of transformers' own)
between the JSON lines; a library's ``warnings.warn`` was two raw lines on stderr; uvicorn's
lines carried a copy of their message with terminal colours (``color_message``).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embedplex.observability import logs
from embedplex.state.keys import KeySpec, KeyStore
from embedplex.state.store import StateStore

ReadLog = Callable[[], list[dict[str, object]]]


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ReadLog]]:
    """``start(level)`` sets the server's JSON log up on a stream of the test's; the reader it
    returns flushes the log and parses every line (each must be one JSON object)."""
    stream = io.StringIO()
    root = logging.getLogger()
    # The levels ``setup_logging`` sets, restored after.
    names = ("httpx", "httpx2", "alembic.runtime.plugins", "aiosqlite")
    quiet = [logging.getLogger(name) for name in names]
    access = logging.getLogger("uvicorn.access")
    saved = root.handlers[:], root.level, [q.level for q in quiet], access.disabled

    def start(level: str) -> ReadLog:
        # Here, in the test: pytest sets its own stderr again as the test's call begins.
        monkeypatch.setattr(sys, "stderr", stream)
        logs.setup_logging(level, "json")

        def read() -> list[dict[str, object]]:
            logs.flush_logs()
            return [json.loads(line) for line in stream.getvalue().splitlines()]

        return read

    yield start
    logs.flush_logs()
    handlers, level, levels, disabled = saved
    root.handlers[:] = handlers
    root.setLevel(level)
    for logger, was in zip(quiet, levels, strict=True):
        logger.setLevel(was)
    access.disabled = disabled
    logging.captureWarnings(False)
    if "transformers" in sys.modules:  # transformers' own defaults, for the tests after
        from transformers.utils import logging as transformers_logging

        transformers_logging.enable_default_handler()
        transformers_logging.disable_propagation()
        transformers_logging.enable_progress_bar()


async def test_debug_log_holds_no_sql_parameter(
    json_log: Callable[[str], ReadLog], tmp_path: Path
) -> None:
    read = json_log("debug")
    async with StateStore.from_url(f"sqlite:///{tmp_path / 'state.db'}") as store:
        record, key = await KeyStore(store).create(KeySpec(name="debug-log-check"))
    logging.getLogger("embedplex.test").debug("debug lines are written")
    lines = read()
    assert any(line["logger"] == "embedplex.test" and line["level"] == "debug" for line in lines)
    text = json.dumps(lines)
    assert record.secret_hash.startswith("$argon2id$")
    assert record.secret_hash not in text and key not in text
    assert not [line for line in lines if line["logger"] == "aiosqlite"]


def test_library_warnings_are_log_lines(json_log: Callable[[str], ReadLog]) -> None:
    read = json_log("info")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library's deprecation\x1b[31m", UserWarning, stacklevel=1)
    found = [line for line in read() if line["logger"] == "py.warnings"]
    assert len(found) == 1 and found[0]["level"] == "warning"
    assert "UserWarning: a library's deprecation\x1b[31m" in str(found[0]["message"])


def test_uvicorn_colour_copy_is_left_out(json_log: Callable[[str], ReadLog]) -> None:
    read = json_log("info")
    # As uvicorn logs (a logger of the test's own: other tests set uvicorn's levels).
    logging.getLogger("embedplex.test.uvicorn").info(
        "Started server process [%d]", 42, extra={"color_message": "Started [\x1b[36m%d\x1b[0m]"}
    )
    (line,) = [line for line in read() if line["logger"] == "embedplex.test.uvicorn"]
    assert line["message"] == "Started server process [42]"
    assert "color_message" not in line


def test_transformers_load_report_is_a_log_line_and_no_bar_is_drawn(
    json_log: Callable[[str], ReadLog], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint without BERT's pooler (as many sentence-transformers models are saved)
    makes transformers report the missing weights as it loads."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from embedplex.backends.model_files import ModelKind, load_transformers_model
    from tiny_models import tiny_bert_config

    transformers.BertModel(tiny_bert_config(100), add_pooling_layer=False).save_pretrained(
        str(tmp_path), safe_serialization=True
    )
    capfd.readouterr()
    read = json_log("info")
    load_transformers_model(tmp_path, ModelKind.EMBEDDING, "bert", torch.float32)
    lines = read()
    reports = [line for line in lines if str(line["logger"]).startswith("transformers")]
    assert reports and "pooler.dense.weight" in str(reports[0]["message"])
    out, err = capfd.readouterr()
    assert "Loading weights" not in err + out and "pooler" not in err + out
