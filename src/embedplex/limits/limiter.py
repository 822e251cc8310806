"""The rate limiter the pipeline asks: in-process, or shared through Redis with a fallback.

Losing Redis must not take the service down, nor open it to unlimited use: when a Redis call
fails, the limiter logs one warning, counts the fallback, and limits in this process alone (so
with N replicas a key may get up to N times its limits) until a probe every
``probe_interval_s`` finds Redis back; then one info line, and shared limits again. Requests
already admitted through Redis give their slot back there; one whose release fails has its
tokens charged locally instead. A request reserves its tokens (``reserve``) where it was
admitted, in this process when that Redis call fails; its finish refunds a reservation taken in
this process here, and settles the rest where it was admitted.

A concurrency slot whose fate Redis did not confirm (its release failed, or its admission timed
out: a stalled Redis may still run the script when it wakes) is remembered and released as soon
as the probe finds Redis back. Left to its lease (``lease_ttl_s``, 5 minutes), a 1.5 s stall
would lock a ``max_concurrent = 1`` key out for those 5 minutes. Releasing is idempotent (a
``ZREM`` of a lease that is not there does nothing), which is why this, rather than shorter
leases refreshed by the requests in flight (a Redis call per request per refresh), is the fix.

Reserved tokens likewise. The script that takes a reservation in Redis records it under its
lease, and the finish charges the request's tokens less what was recorded there, so a
reservation call that timed out or was cancelled (sent: Redis may run it when it reads it) is
refunded exactly if it ran. The finish of a lease with such a call marks it settled, so that a
call still on its way takes nothing. A finish that fails charges the request's tokens in this
process, and the probe's settle gives back what the lease reserved in Redis (nothing if the
finish ran there after all). The common path stays one round trip per reservation and one per
finish.

One key's state in Redis that the scripts cannot read (``WRONGTYPE``: a hand edit, another
writer) is not Redis going away: that key's state is reset and the call counted here, and the
other keys stay shared (``_broken``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from embedplex.core.tenant import KeyLimits
from embedplex.limits.gcra import LocalLimits, Verdict
from embedplex.limits.redis_store import RedisLimits, redis_client

logger = logging.getLogger(__name__)

MAX_UNSETTLED = 10_000  # leases remembered for release while Redis is away, at most


class LimitObserver(Protocol):
    """Metrics hooks; cheap and never raising."""

    def on_refused(self, key_id: str, reason: str) -> None: ...

    def on_backend(self, backend: str) -> None:
        """The limiter now counts in ``backend`` (``redis`` or ``local``)."""


class _NullObserver:
    def on_refused(self, key_id: str, reason: str) -> None:
        pass

    def on_backend(self, backend: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Lease:
    """An admitted request's hold on its key: given back by ``RateLimiter.finish``."""

    key: str
    limits: KeyLimits
    lease_id: str
    shared: bool


class RateLimiter:
    """Admits requests against their key's limits; ``finish`` releases and charges tokens.

    ``__init__`` does no I/O (the Redis client connects on first use); ``aclose`` stops the
    probe and closes the client.
    """

    def __init__(
        self,
        shared: RedisLimits | None = None,
        *,
        probe_interval_s: float = 5.0,
        observer: LimitObserver | None = None,
    ) -> None:
        self.local = LocalLimits()
        self.shared = shared
        self.probe_interval_s = probe_interval_s
        self.observer: LimitObserver = observer or _NullObserver()
        self.redis_up = shared is not None
        self._probe: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()
        self._prefix = os.urandom(6).hex()
        # Per key, its tpm (0: none) and the leases to settle in Redis once it answers again
        # (module docstring).
        self._unsettled: dict[str, tuple[int, set[str]]] = {}
        # Leases with a reservation call whose outcome is unknown (timed out, cancelled).
        self._doubtful: set[str] = set()
        self._resetting: set[str] = set()  # keys whose broken state in Redis is being deleted
        # What losing Redis looks like from redis-py: its own errors and the OS's under them.
        self._errors = shared.errors if shared is not None else ()
        self.observer.on_backend(self.backend)

    @classmethod
    def from_url(
        cls,
        redis_url: str | None,
        *,
        timeout_s: float = 0.5,
        probe_interval_s: float = 5.0,
        observer: LimitObserver | None = None,
    ) -> RateLimiter:
        """In-process limits, or shared through the Redis at ``redis_url``."""
        shared = None
        if redis_url:  # redis is imported only then: most servers never import it
            shared = RedisLimits(redis_client(redis_url, timeout_s))
        return cls(shared, probe_interval_s=probe_interval_s, observer=observer)

    @property
    def backend(self) -> str:
        return "redis" if self.redis_up else "local"

    async def admit(self, key: str, limits: KeyLimits) -> tuple[Verdict, Lease | None]:
        """The verdict, and the lease to ``finish`` when admitted."""
        lease_id = f"{self._prefix}-{next(self._ids)}"
        verdict: Verdict | None = None
        shared = self.shared is not None and self.redis_up
        if shared and self.shared is not None:
            try:
                verdict = await self.shared.admit(key, limits, lease_id)
            except self._errors as exc:
                if not self._broken(key, exc):
                    if limits.max_concurrent is not None:  # Redis may take it when it wakes
                        self._unsettle(key, limits, lease_id)
                    self._lost(exc)
                shared = False
        if verdict is None:
            verdict = self.local.admit(key, limits)
        if self._refused(key, verdict).refused is not None:
            return verdict, None
        return verdict, Lease(key, limits, lease_id, shared)

    async def reserve(self, lease: Lease, tokens: int, held: int = 0) -> tuple[Verdict, bool]:
        """Reserve ``tokens`` for ``lease``'s request, which holds ``held`` already
        (``LocalLimits.reserve``): the verdict, and whether Redis took it (else this process
        did: the lease's admission was local, or Redis failed now)."""
        if lease.shared and self.shared is not None and self.redis_up:
            try:
                verdict = await self.shared.reserve(
                    lease.key, lease.limits, tokens, held, lease=lease.lease_id
                )
            except self._errors as exc:
                if not self._broken(lease.key, exc):
                    self._doubtful.add(lease.lease_id)  # it may run when Redis reads it
                    self._lost(exc)
            except BaseException:
                self._doubtful.add(lease.lease_id)  # cancelled: sent, and may run all the same
                raise
            else:
                return self._refused(lease.key, verdict), True
        verdict = self.local.reserve(lease.key, lease.limits, tokens, held)
        return self._refused(lease.key, verdict), False

    def _refused(self, key: str, verdict: Verdict) -> Verdict:
        if verdict.refused is not None:
            self.observer.on_refused(key, verdict.refused)
        return verdict

    def finish(
        self, lease: Lease, tokens: int, *, reserved: int = 0, reserved_here: int = 0
    ) -> asyncio.Task[None] | None:
        """Give the slot back and charge ``tokens`` less the ``reserved`` part of them (of
        which ``reserved_here`` was taken in this process: refunded here); never raises, never
        waits. For a lease admitted in Redis, Redis settles what the lease reserved there,
        as its script recorded it (a call whose caller gave up may have run).

        Synchronous so that it runs whatever ended the request (an error, a disconnect, a
        cancelled task): the Redis call goes on in a task of its own, returned so that a caller
        that can wait (an answer not yet written) does; None when the slot is back already.
        """
        if not lease.shared or self.shared is None:
            self.local.finish(lease.key, lease.limits, tokens - reserved)
            return None
        if reserved_here:
            self.local.charge(lease.key, lease.limits, -reserved_here)
        doubt = lease.lease_id in self._doubtful
        self._doubtful.discard(lease.lease_id)
        task = asyncio.get_running_loop().create_task(self._finish_shared(lease, tokens, doubt))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _finish_shared(self, lease: Lease, tokens: int, doubt: bool) -> None:
        assert self.shared is not None
        try:
            await self.shared.finish(lease.key, lease.limits, lease.lease_id, tokens, doubt=doubt)
        except self._errors as exc:
            if self._broken(lease.key, exc):
                return  # its state is reset: nothing of it is left to settle
            self._unsettle(lease.key, lease.limits, lease.lease_id)
            self._lost(exc)
            # Its tokens count here instead; what it reserved in Redis is given back there
            # when the probe settles it (unless this finish ran there after all).
            self.local.charge(lease.key, lease.limits, max(tokens, 0))

    def _unsettle(self, key: str, limits: KeyLimits, lease_id: str) -> None:
        """Remember a lease Redis may hold (a slot, reserved tokens), to settle when it is back
        (a bounded number: past it, a slot expires with its lease, tokens with the window)."""
        if limits.max_concurrent is None and limits.tpm is None:
            return
        if self._unsettled_count() >= MAX_UNSETTLED:
            return
        _, ids = self._unsettled.get(key, (0, set()))
        ids.add(lease_id)
        self._unsettled[key] = (limits.tpm or 0, ids)

    def _unsettled_count(self) -> int:
        return sum(len(ids) for _, ids in self._unsettled.values())

    def _broken(self, key: str, exc: BaseException) -> bool:
        """A call that failed because ``key``'s state in Redis is not what the scripts write
        (``RedisLimits.broken``): reset it in the background and count this call in the
        process; Redis is not away, so every other key stays shared. True when so.

        Before, it was taken for Redis going away: every key fell back to per-process limits
        until the probe, which then failed to settle that key's leases for ever."""
        assert self.shared is not None
        if not self.shared.broken(exc):
            return False
        if key not in self._resetting:
            self._resetting.add(key)
            logger.warning(
                "rate limits: key %s's state in Redis is not what embedplex writes (%s); "
                "reset (its buckets start full)",
                key,
                str(exc).split("\n", 1)[0][:120],
            )
            task = asyncio.get_running_loop().create_task(self._reset(key))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return True

    async def _reset(self, key: str) -> None:
        assert self.shared is not None
        try:
            await self.shared.reset(key)
        except self._errors as exc:
            self._lost(exc)
        finally:
            self._resetting.discard(key)

    def _lost(self, exc: BaseException) -> None:
        """Fall back to per-process limits: one log line, and a probe until Redis returns."""
        if not self.redis_up:
            return
        self.redis_up = False
        logger.warning(
            "rate limits: Redis unreachable (%s); limiting per process until it returns",
            type(exc).__name__,
        )
        self.observer.on_backend("local")
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        assert self.shared is not None
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.shared.ping()
                await self._settle()
            except self._errors:
                continue
            self.redis_up = True
            logger.info("rate limits: Redis is back; limits are shared again")
            self.observer.on_backend("redis")
            return

    async def _settle(self) -> None:
        """Settle the remembered leases in Redis (forgotten only once that succeeded)."""
        assert self.shared is not None
        if not self._unsettled:
            return
        leases, self._unsettled = self._unsettled, {}
        try:
            await self.shared.settle(leases)
        except BaseException:
            for key, (tpm, ids) in leases.items():
                _, now = self._unsettled.get(key, (tpm, set()))
                self._unsettled[key] = (tpm, ids | now)
            raise

    async def aclose(self) -> None:
        """Stop probing, let pending releases finish, close the Redis client."""
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=1.0)
        if self.shared is not None:
            await self.shared.aclose()
