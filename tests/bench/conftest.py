"""Fixtures for the bench tests: an in-process server with the fake backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from embedplex.bench.inprocess import running_server

ServerFactory = Callable[..., Any]


@pytest.fixture
def server() -> ServerFactory:
    return running_server
