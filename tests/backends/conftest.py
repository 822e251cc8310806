"""Fixtures shared by the backend tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tiny_models import ship_onnx


@pytest.fixture(scope="module")
def shipped_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its own ``onnx/model.onnx`` (served float32 without a child)."""
    root = tmp_path_factory.mktemp("shipped") / "m"
    shutil.copytree(tiny_model_dir, root)
    return ship_onnx(root)
