"""A load failure the operator fixes is one line; one a fault in code caused keeps its traceback.

The loaders wrap what they catch (``raise FatalBackendError(...) from exc``: onnx._sessions,
tokenizer_for, the hub): ``log_failure`` printed every ``FatalBackendError`` as one line, so an
``AttributeError`` deep in a library lost where it happened at the default log level.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from embedplex.backends import onnx
from embedplex.backends.model_files import load_spec, tokenizer_for
from embedplex.core.errors import FatalBackendError
from embedplex.core.faults import fault
from embedplex.observability.logs import log_failure

log = logging.getLogger("embedplex.test.load")


def _logged(caplog: pytest.LogCaptureFixture, exc: BaseException) -> logging.LogRecord:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=log.name):
        log_failure(log, exc, "model loading failed")
    (record,) = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert record.levelno == logging.ERROR
    return record


def _raised(call: object, *args: object) -> FatalBackendError:
    with pytest.raises(FatalBackendError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


def test_a_bug_under_onnx_sessions_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        return None.shape  # type: ignore[attr-defined]  # any bug, deep in a call

    monkeypatch.setattr(onnx, "make_session", broken)
    exc = _raised(onnx._sessions, tmp_path / "model.onnx", "cpu", 1, None)
    record = _logged(caplog, exc)
    assert record.getMessage().startswith("model loading failed: cannot load the ONNX graph")
    assert record.exc_info is not None
    assert isinstance(fault(exc), AttributeError)
    assert "None.shape" in caplog.text  # the line that failed


def test_a_damaged_graph_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"not a graph")
    exc = _raised(onnx._sessions, graph, "cpu", 1, None)  # onnxruntime's own InvalidProtobuf
    record = _logged(caplog, exc)
    assert "INVALID_PROTOBUF" in record.getMessage()
    assert record.exc_info is None and "Traceback" not in caplog.text


def test_a_malformed_tokenizer_file_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tokenizers library raises a bare ``Exception`` for it: its report, not a bug."""
    spec = load_spec("tiny", tiny_model_dir)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    exc = _raised(tokenizer_for, dataclasses.replace(spec, path=tmp_path))
    record = _logged(caplog, exc)
    assert "cannot load the tokenizer" in record.getMessage()
    assert record.exc_info is None


def _wrapped(cause: BaseException | None) -> FatalBackendError:
    """A loader's wrapping: ``raise FatalBackendError(...) from cause``, raised and caught."""
    with pytest.raises(FatalBackendError) as caught:
        raise FatalBackendError("cannot load model 'x': the reason") from cause
    return caught.value


@pytest.mark.parametrize(
    "cause",
    [
        OSError(13, "Permission denied"),
        ValueError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
        ImportError("No module named 'torch'"),
        None,
    ],
)
def test_the_operators_failures_stay_one_line(
    cause: BaseException | None, caplog: pytest.LogCaptureFixture
) -> None:
    record = _logged(caplog, _wrapped(cause))
    assert record.getMessage() == "model loading failed: cannot load model 'x': the reason"
    assert record.exc_info is None


def test_the_hubs_own_errors_are_reports(caplog: pytest.LogCaptureFixture) -> None:
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    for error in (LocalEntryNotFoundError("not in the cache"), HFValidationError("Repo id")):
        exc = _wrapped(error)
        assert fault(exc) is None
        assert _logged(caplog, exc).exc_info is None


@pytest.mark.parametrize("bug", [TypeError("x"), KeyError("x"), RuntimeError("x")])
def test_any_other_cause_is_a_fault(bug: BaseException) -> None:
    assert fault(_wrapped(bug)) is bug
