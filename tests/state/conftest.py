"""Fixtures of the key verifier's tests (``test_verifier_*.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from embedplex.state import cache
from embedplex.state.keys import KeyStore, verify_hash
from embedplex.state.store import StateStore


@pytest.fixture
async def keys(tmp_path: Path) -> AsyncIterator[KeyStore]:
    """A key store on a fresh SQLite file."""
    async with StateStore.from_url(f"sqlite:///{tmp_path / 'state.db'}") as store:
        yield KeyStore(store)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key the verifier hashes, in order."""
    seen: list[str] = []

    def counting(stored: str, presented: str) -> bool:
        seen.append(presented)
        return verify_hash(stored, presented)

    monkeypatch.setattr(cache, "verify_hash", counting)
    return seen
