"""Verifying presented keys without an argon2 hash per request, and seeing changes quickly.

A verified key is cached under an HMAC-SHA256 (keyed with random bytes of this process) of the
whole presented key, so the cache never holds a key in clear and a hit costs one HMAC and one
dict lookup. Every ``poll_s`` (at most 2 s) a background task reads the store's change
counter; when it moved (a key created, revoked, rotated), the cache is emptied, so the next
request of each key is verified against the store again: a revoked or rotated key stops
working on every replica within ``poll_s`` plus one read. Expiry is checked on every hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from embedplex.core.tenant import Tenant
from embedplex.state.keys import KeyStore, split_key, verify_hash

logger = logging.getLogger(__name__)

_MAX_ENTRIES = 10_000  # distinct verified keys held; past it the cache starts over
_HASHES_AT_ONCE = 2  # argon2 verifications at once: a flood of wrong keys costs bounded CPU


@dataclass(frozen=True, slots=True)
class _Entry:
    tenant: Tenant
    expires: float | None  # epoch seconds


class KeyStoreUnavailableError(Exception):
    """The store could not be read to verify a key not seen before (answered 503)."""


class KeyRejectedError(Exception):
    """The presented key is not a valid, active key; ``reason`` is safe to show the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyVerifier:
    """The managed keys as seen by one server process."""

    def __init__(self, keys: KeyStore, *, poll_s: float = 1.0, require: bool = False) -> None:
        self.keys = keys
        self.poll_s = poll_s
        self.require = require
        self.required = require  # becomes true once the store holds a key
        self.version = -1
        self._secret = os.urandom(32)
        self._cache: dict[bytes, _Entry] = {}
        self._hashing = asyncio.Semaphore(_HASHES_AT_ONCE)
        self._poller: asyncio.Task[None] | None = None
        # Called after each change the poller sees (the stored providers' sync).
        self.listeners: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        await self.refresh()
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def refresh(self) -> None:
        """Re-read the change counter; on a change, forget every verified key."""
        version = await self.keys.store.version()
        if version != self.version:
            self.required = self.require or await self.keys.any()
            self._cache.clear()
            self.version = version
            for listener in self.listeners:
                try:
                    await listener()
                except Exception:
                    logger.exception("applying a state store change failed")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # the store is away: keep what we know, say so, retry
                logger.warning("state store poll failed: %s", type(exc).__name__)

    def _digest(self, presented: bytes) -> bytes:
        return hmac.digest(self._secret, presented, "sha256")

    def cached(self, presented: bytes) -> Tenant | None:
        """The tenant of a key verified before and unchanged since; None: verify it."""
        entry = self._cache.get(self._digest(presented))
        if entry is None:
            return None
        if entry.expires is not None and entry.expires <= time.time():
            raise KeyRejectedError("API key expired")
        return entry.tenant

    async def verify(self, presented: bytes) -> Tenant:
        """Look the key's row up by its id and check the hash; cache the result."""
        try:
            text = presented.decode("ascii")
        except UnicodeDecodeError:
            raise KeyRejectedError("invalid API key") from None
        parts = split_key(text)
        if parts is None:
            raise KeyRejectedError("invalid API key")
        version = self.version
        try:
            record = await self.keys.get(parts[0])
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("key lookup failed: %s", type(exc).__name__)
            raise KeyStoreUnavailableError from None
        if record is None:
            raise KeyRejectedError("invalid API key")
        async with self._hashing:
            ok = await asyncio.to_thread(verify_hash, record.secret_hash, text)
        if not ok:
            raise KeyRejectedError("invalid API key")
        status = record.status()
        if status != "active":
            raise KeyRejectedError(f"API key {status}")
        tenant = record.tenant()
        if version == self.version:  # not stale: no change landed while we looked
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            expires = record.expires_at.timestamp() if record.expires_at else None
            self._cache[self._digest(presented)] = _Entry(tenant, expires)
        return tenant
