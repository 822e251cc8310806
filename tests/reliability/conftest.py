"""The reliability suite: every test here carries the ``reliability`` marker, and ``slow`` (each
starts server processes). ``make reliability`` runs it at full size (``procs.FULL``)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.slow)
