from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_bert


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session-wide: the default state store lives under XDG_DATA_HOME, and fixtures wider than
    a test (a module's server) start before ``_isolated_env`` runs: never the developer's."""
    import os

    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-session"))
    yield
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before


@pytest.fixture(autouse=True)
def _isolated_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """No test reads the developer's EMBEDPLEX_* variables or writes to their caches."""
    import os

    for key in list(os.environ):
        if key.startswith("EMBEDPLEX_"):
            monkeypatch.delenv(key)
    # The default state store (state/url.py) lives under XDG_DATA_HOME: one per test.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    return


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for every real-model test of the session."""
    return tmp_path_factory.getbasetemp() / "real-model-cache"


@pytest.fixture(scope="session")
def reference() -> object:
    """sentence-transformers vectors of ``reference.TEXTS`` (computed once per session)."""
    from reference import TEXTS, st_vectors

    return st_vectors(TEXTS)
