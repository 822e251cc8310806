"""Verifying presented keys without an argon2 hash per request, and seeing changes quickly.

A verified key is cached under an HMAC-SHA256 (keyed with random bytes of this process) of the
whole presented key, so the cache never holds a key in clear and a hit costs one HMAC and one
dict lookup. Every ``poll_s`` (at most 2 s) a background task reads the store's change
counter; when it moved (a key created, revoked, rotated, a provider stored), the rows of the
cached keys are read again in the same poll: a key revoked, rotated (its hash changed) or gone
is dropped, and one whose limits changed takes them, so a revoked or rotated key stops working
on every replica within ``poll_s`` plus one read. The others stay verified: a change costs no
hash per active key, and keys verified before it keep working if the store goes away after it
(when those rows cannot be read, every key is forgotten: a revocation is never missed). Expiry
is checked on every hit. The change's other listeners (the stored providers' sync, which may
wait on an upstream) run in a task of their own, so they never hold up the next poll.

Refusals must cost little too, since hostile callers choose them (docs/keys.md, "Cost per
request"): a revoked or expired row is refused before any hash; a refused key is remembered
for a few seconds under the same HMAC (bounded, emptied on every change), so repeating it costs
a lookup; concurrent requests of one key share one verification; and past a bounded queue for
the two hashing slots a new key is refused at once (``KeyVerifierBusyError``, a 429) rather
than left waiting behind a flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from embedplex.core.tenant import Tenant
from embedplex.state.keys import KeyRecord, KeyStore, split_key, verify_hash
from embedplex.state.store import STORE_ERRORS

logger = logging.getLogger(__name__)

_MAX_ENTRIES = 10_000  # distinct verified keys held; past it the cache starts over
_HASHES_AT_ONCE = 2  # argon2 verifications at once: a flood of wrong keys costs bounded CPU
# Verifications queued for a hashing slot; past it a new key is refused at once (429). With
# two slots this bounds a new key's wait behind a flood to about 16 hashes.
_HASH_WAITERS = 32
# Of those, queued for one key id: a flood of random secrets on one id (a caller's own, say)
# cannot fill the queue for every other key. A burst of one key's first requests is one
# verification (they share it), so a real client needs one place.
_ID_WAITERS = 4
# Refused keys remembered: long enough that a client retrying a wrong or revoked key in a loop
# costs lookups, short enough that nothing but a change could make it valid meanwhile (and a
# change empties it anyway); bounded, so random keys cannot grow it.
_FAILED_TTL_S = 5.0
_FAILED_MAX = 4096
_INVALID = "invalid API key"


def _why(exc: BaseException) -> str:
    """A store failure in a log line: its type, and for a timeout what it means."""
    if isinstance(exc, TimeoutError):
        return "TimeoutError (the store did not answer within state_timeout_s)"
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class _Entry:
    tenant: Tenant
    expires: float | None  # epoch seconds
    secret_hash: str  # the row's hash it was verified against: a rotation changes it

    @classmethod
    def of(cls, record: KeyRecord) -> _Entry:
        expires = record.expires_at.timestamp() if record.expires_at else None
        return cls(record.tenant(), expires, record.secret_hash)


class KeyStoreUnavailableError(Exception):
    """The store could not be read to verify a key not seen before (answered 503)."""


class KeyVerifierBusyError(Exception):
    """Too many new keys already wait for a hashing slot (answered 429 at once)."""


class KeyRejectedError(Exception):
    """The presented key is not a valid, active key; ``reason`` is safe to show the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Refused:
    """HMACs of keys refused lately, each for ``ttl`` seconds from its refusal.

    Every entry lives the same time, so insertion order is expiry order: expired entries are
    dropped from the front on each insert, and past ``max_entries`` the oldest go first. A hit
    does not extend an entry: a key is verified again ``ttl`` after it was refused.
    """

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._until: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, digest: bytes) -> bool:
        until = self._until.get(digest)
        return until is not None and until > time.monotonic()

    def add(self, digest: bytes) -> None:
        now = time.monotonic()
        self._until.pop(digest, None)
        self._until[digest] = now + self.ttl
        while self._until and (
            len(self._until) > self.max_entries or next(iter(self._until.values())) <= now
        ):
            self._until.popitem(last=False)

    def clear(self) -> None:
        self._until.clear()


class KeyVerifier:
    """The managed keys as seen by one server process."""

    def __init__(
        self,
        keys: KeyStore,
        *,
        poll_s: float = 1.0,
        require: bool = False,
        hashes_at_once: int = _HASHES_AT_ONCE,
        hash_waiters: int = _HASH_WAITERS,
        id_waiters: int = _ID_WAITERS,
        refused_ttl_s: float = _FAILED_TTL_S,
        refused_max: int = _FAILED_MAX,
    ) -> None:
        self.keys = keys
        self.poll_s = poll_s
        self.require = require
        self.required = require  # becomes true once the store holds a key
        self.version = -1
        self._secret = os.urandom(32)
        self._cache: dict[bytes, _Entry] = {}
        self._refused = _Refused(refused_ttl_s, refused_max)
        self._hashing = asyncio.Semaphore(hashes_at_once)
        self._hash_waiters = hash_waiters
        self._id_waiters = id_waiters
        self._waiting = 0  # verifications queued for a hashing slot
        self._waiting_for: dict[str, int] = {}  # of those, by key id (ids with any only)
        # One verification per presented key at a time (by HMAC); later requests join it.
        self._flights: dict[tuple[bytes, int], asyncio.Task[Tenant]] = {}
        # Keys verified before the last change (their HMACs): checked again after it, but never
        # refused for a full queue (a change empties the cache, and every active client's next
        # request needs a hash at once: past the queue's bound they got 429 after any change).
        self._verified_before: set[bytes] = set()
        self._poller: asyncio.Task[None] | None = None
        # Called after each change the poller sees (the stored providers' sync).
        self.listeners: list[Callable[[], Awaitable[None]]] = []
        self._notify_due = False
        # The poller's changes are told to the listeners by this task, woken by ``_wake``: a
        # listener that waits (a provider's upstream) must not delay the next key poll.
        self._notifier: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # One refresh at a time (the poller's and an admin route's ``changed``): interleaved,
        # the slower could set the version back and let a verification from before a
        # revocation be cached as current.
        self._refreshing = asyncio.Lock()

    async def start(self) -> None:
        await self.refresh()
        loop = asyncio.get_running_loop()
        self._poller = loop.create_task(self._poll())
        self._notifier = loop.create_task(self._notify_when_woken())

    async def close(self) -> None:
        for task in (self._poller, self._notifier):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def refresh(self, *, notify: bool = True) -> None:
        """Re-read the change counter; on a change, check the verified keys against their rows
        (``_recheck``) and forget the refused ones. ``notify``: tell the listeners here and
        now; else the notifier task does, and the caller does not wait for them.

        Each read is bounded (``StateStore.bounded``): a store that stops answering raises
        ``TimeoutError`` here after ``state_timeout_s`` rather than holding the poller."""
        store = self.keys.store
        async with self._refreshing:
            version = await store.bounded(store.version())
            if version != self.version:
                self.required = self.require or await store.bounded(self.keys.any())
                await self._recheck()
                self._refused.clear()
                self.version = version
                self._notify_due = True
        if not self._notify_due:  # due: a change seen, or one a listener failed to apply
            return
        if notify:
            self._notify_due = False
            if not await self._notify():
                self._notify_due = True
        else:
            self._wake.set()

    async def _recheck(self) -> None:
        """Check each verified key against its row as it is now (one bounded read): drop the
        ones revoked, rotated or gone, give the others their row's limits and expiry. Nothing
        is hashed: an unchanged hash is the one the key was verified against. A read that
        fails forgets every verified key (the change may be a revocation) and raises."""
        ids = {e.tenant.key_id for e in self._cache.values() if e.tenant.key_id is not None}
        if not ids:
            return
        try:
            rows = await self.keys.store.bounded(self.keys.get_many(ids))
        except BaseException:
            self._forget_verified()
            raise
        # Entries cached while the rows were read (a verification from before the change)
        # are checked too; an id not read is dropped.
        for digest, entry in list(self._cache.items()):
            key_id = entry.tenant.key_id
            record = rows.get(key_id) if key_id is not None and key_id in ids else None
            if (
                record is None
                or record.revoked_at is not None
                or record.secret_hash != entry.secret_hash
            ):
                del self._cache[digest]
            else:
                self._cache[digest] = _Entry.of(record)

    async def _notify_when_woken(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._notify_due:
                self._notify_due = False
                if not await self._notify():
                    self._notify_due = True  # the next poll wakes this again

    async def _notify(self) -> bool:
        """Tell each listener of a change; False when one failed (it is told again later)."""
        done = True
        for listener in self.listeners:
            try:
                await listener()
            except STORE_ERRORS as exc:
                logger.warning("applying a state store change failed: %s", _why(exc))
                done = False
            except Exception:
                logger.exception("applying a state store change failed")
                done = False
        return done

    def _forget_verified(self) -> None:
        self._verified_before = set(self._cache) | self._verified_before
        if len(self._verified_before) > _MAX_ENTRIES:
            self._verified_before = set(self._cache)
        self._cache.clear()
        self._refused.clear()

    async def changed(self) -> None:
        """A change to keys was just written through this process: apply it here at once. If
        the store cannot be read back, forget every verified key anyway (the next request of
        each is verified against the store), so none outlives a revocation made here."""
        try:
            await self.refresh(notify=False)
        except STORE_ERRORS as exc:
            logger.warning("reading the state store after a change failed: %s", _why(exc))
            self._forget_verified()
            self.required = True  # a change to keys leaves a key in the store
            self.version = -1  # the next poll that reads the store applies the change

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh(notify=False)
            except Exception as exc:  # the store is away: keep what we know, say so, retry
                logger.warning("state store poll failed: %s", _why(exc))

    def _digest(self, presented: bytes) -> bytes:
        return hmac.digest(self._secret, presented, "sha256")

    def _known(self, digest: bytes) -> Tenant | None:
        entry = self._cache.get(digest)
        if entry is None:
            if digest in self._refused:
                raise KeyRejectedError(_INVALID)
            return None
        # Only a key this process verified says "expired": its holder has shown the secret.
        if entry.expires is not None and entry.expires <= time.time():
            raise KeyRejectedError("API key expired")
        return entry.tenant

    def cached(self, presented: bytes) -> Tenant | None:
        """The tenant of a key verified before and unchanged since; None: verify it.

        Raises ``KeyRejectedError`` for a key refused within the last few seconds.
        """
        return self._known(self._digest(presented))

    async def verify(self, presented: bytes) -> Tenant:
        """Look the key's row up by its id and check the hash; cache the result either way.

        Raises ``KeyRejectedError``, ``KeyStoreUnavailableError``, or ``KeyVerifierBusyError``
        when the queue for a hashing slot is full.
        """
        try:
            text = presented.decode("ascii")
        except UnicodeDecodeError:
            raise KeyRejectedError(_INVALID) from None
        parts = split_key(text)
        if parts is None:  # free to refuse: not worth a place among the refused keys
            raise KeyRejectedError(_INVALID)
        digest = self._digest(presented)
        known = self._known(digest)
        if known is not None:
            return known
        # A verification of this very key under way (a client's burst of first requests, or a
        # flood repeating one wrong key) is joined, not repeated. One that started before a
        # change landed answers as it would have a moment earlier; it caches nothing.
        # Joined only within one version: a request after a change (a revocation seen) never
        # takes the answer of a verification that read the key before it.
        flying = (digest, self.version)
        flight = self._flights.get(flying)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._verify(text, parts[0], digest))
            self._flights[flying] = flight
            flight.add_done_callback(functools.partial(self._landed, flying))
        # Shielded: one caller going away must not cancel the others' verification.
        return await asyncio.shield(flight)

    def _landed(self, flying: tuple[bytes, int], flight: asyncio.Task[Tenant]) -> None:
        del self._flights[flying]
        if not flight.cancelled():
            flight.exception()  # retrieved: every caller may have gone, that is no error

    async def _verify(self, text: str, key_id: str, digest: bytes) -> Tenant:
        version = self.version
        try:
            record = await self._check(text, key_id, digest in self._verified_before)
        except KeyRejectedError:
            if version == self.version:  # not stale: no change landed while we looked
                self._refused.add(digest)
            raise
        if version == self.version:
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[digest] = _Entry.of(record)
            self._verified_before.discard(digest)
        return record.tenant()

    async def _check(self, text: str, key_id: str, known: bool = False) -> KeyRecord:
        """The key's row once it and the hash are checked; ``known``: verified before its
        cache entry was forgotten, so it waits for a hashing slot however long the queue."""
        try:
            # Bounded: a store that stops answering fails this lookup (503) within
            # state_timeout_s, and so every request that joined this verification.
            record = await self.keys.store.bounded(self.keys.get(key_id))
        except STORE_ERRORS as exc:
            logger.warning("key lookup failed: %s", _why(exc))
            raise KeyStoreUnavailableError from None
        # A revoked or expired row is refused before the hash, as an unknown id is, and in the
        # same words: without the hash nothing shows the caller holds the secret, and saying
        # "revoked" would tell anyone who knows an id that it once was a key. Key ids are not
        # secret (logs, metrics); an active id still costs a hash, as before.
        if record is None or record.status() != "active":
            raise KeyRejectedError(_INVALID)
        if known:
            await self._hashing.acquire()
        else:
            async with self._queued(key_id):
                await self._hashing.acquire()
        try:
            ok = await asyncio.to_thread(verify_hash, record.secret_hash, text)
        finally:
            self._hashing.release()
        if not ok:
            raise KeyRejectedError(_INVALID)
        return record

    @contextlib.asynccontextmanager
    async def _queued(self, key_id: str) -> AsyncIterator[None]:
        """A place in the queue for a hashing slot, or ``KeyVerifierBusyError`` at once."""
        mine = self._waiting_for.get(key_id, 0)
        if self._waiting >= self._hash_waiters or mine >= self._id_waiters:
            raise KeyVerifierBusyError
        self._waiting += 1
        self._waiting_for[key_id] = mine + 1
        try:
            yield
        finally:
            self._waiting -= 1
            left = self._waiting_for[key_id] - 1
            if left:
                self._waiting_for[key_id] = left
            else:
                del self._waiting_for[key_id]
