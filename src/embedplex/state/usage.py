"""Per-key usage: counted in memory per request, written to the store in batches.

``UsageMeter.add`` is called once per finished request (``api/observe.py``) and only adds to a
dict; every ``flush_s`` the counts are written, in one transaction, as upserts of up to
``CHUNK_ROWS`` (key, minute) rows each, so the store sees a few statements every several
seconds however busy the server is. A crash loses at most ``flush_s`` of counts.

Each flush is a batch with its own id, claimed in ``usage_flushes`` in the same transaction as
its upserts, so it is added exactly once. A write whose outcome is not known (it failed, it
was cancelled; the store may have committed it and lost the answer) keeps its batch *pending*:
the next flush writes that batch again, under its id, before anything else; an id already
claimed means the first write committed, and nothing is added again. While the pending batch
cannot be written, new counts wait in memory (one entry per key and minute, as before), so
there is never more than one pending batch. Claims older than ``CLAIMS_KEPT`` are deleted
(about hourly, in a flush's transaction): a replica cut off from its store for longer than
that may count its last unconfirmed flush twice (docs/keys.md).

A flush is not abandoned at ``state_timeout_s`` as other store calls are: it waits for the
driver's answer, each step of which ``state_timeout_s`` bounds. ``close`` (a SIGTERM) lets a
flush under way finish, then writes the rest; counts that still cannot be written are logged
as lost (how many requests), never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Executable, Table, delete, func, select

from embedplex.state import schema
from embedplex.state.store import StateStore, now

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

logger = logging.getLogger(__name__)

_FIELDS = ("requests", "inputs", "tokens", "refusals")

# Rows per INSERT: each row binds 6 parameters and asyncpg takes at most 32,767 per statement,
# so one statement for a whole flush failed past ~5,460 (key, minute) rows, and kept failing
# as each failed flush joined the next. 1,000 rows stay far under both dialects' limits.
CHUNK_ROWS = 1000

# How long a flush's claim is kept (a retry later than this may count it twice), and how often
# a replica deletes older ones.
CLAIMS_KEPT = timedelta(days=7)
PRUNE_EVERY_S = 3600.0

Counts = dict[tuple[str, int], list[int]]  # (key id, minute since epoch) -> _FIELDS


@dataclass(frozen=True, slots=True)
class _Batch:
    """One flush's counts and the id that makes its write happen once."""

    id: str
    counts: Counts

    def requests(self) -> int:
        return sum(c[0] for c in self.counts.values())


@dataclass(slots=True)
class UsageTotals:
    key_id: str
    name: str | None
    requests: int
    inputs: int
    tokens: int
    refusals: int


class UsageMeter:
    """Counts per (key id, minute) in memory; ``flush`` writes and resets them."""

    def __init__(self, store: StateStore, *, flush_s: float = 10.0) -> None:
        self.store = store
        self.flush_s = flush_s
        self._counts: Counts = {}
        self._pending: _Batch | None = None  # written, outcome unknown: retried under its id
        self._prune_at = 0.0  # monotonic: when a flush next deletes old claims
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def add(self, key_id: str, inputs: int, tokens: int, refused: bool) -> None:
        bucket = int(time.time()) // 60
        counts = self._counts.get((key_id, bucket))
        if counts is None:
            counts = self._counts[(key_id, bucket)] = [0, 0, 0, 0]
        counts[0] += 1
        counts[1] += inputs
        counts[2] += tokens
        counts[3] += refused

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop the periodic flush without cutting one short, then write what is left.

        A flush under way is waited for (each of its steps is bounded) rather than
        cancelled; past a second bound it is cancelled, and its batch stays pending, to be
        written (once) by the flush here."""
        if self._task is not None:
            self._stopping.set()
            done, _ = await asyncio.wait([self._task], timeout=2 * self.store.timeout_s)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self.flush()
        pending, counts = self._pending, self._counts
        self._pending, self._counts = None, {}
        unsure = pending.requests() if pending is not None else 0
        lost = unsure + sum(c[0] for c in counts.values())
        key_minutes = len(counts) + (len(pending.counts) if pending is not None else 0)
        if lost:
            logger.warning(
                "usage of %d requests (%d key-minutes) lost: the state store could not be "
                "written before shutdown%s",
                lost,
                key_minutes,
                f" ({unsure} of them from a flush it did not confirm: those may have been written)"
                if unsure
                else "",
            )

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_s)
            if not self._stopping.is_set():
                await self.flush()

    async def flush(self) -> None:
        """Write the pending batch, if any, then (once it is written) the counts since."""
        if self._pending is not None and not await self._send(self._pending):
            return  # the store still fails: new counts wait, at most one batch pending
        counts, self._counts = self._counts, {}
        if counts:
            await self._send(_Batch(uuid.uuid4().hex, counts))

    async def _send(self, batch: _Batch) -> bool:
        """Write ``batch``; True once the store confirms it (or had it already). Until then it
        is the pending batch: on a failure, and on a cancellation too."""
        self._pending = batch
        try:
            # Not ``store.bounded``: a write given up on at the bound could still commit, and
            # its retry would only wait for it. The driver bounds each step instead (connect,
            # pool wait, each statement: ``state_timeout_s``; SQLite's busy timeout below it).
            written = await self._write(batch)
        except Exception as exc:
            logger.warning(
                "usage flush failed (%s); retried at the next one, under the same flush id",
                type(exc).__name__,
            )
            return False
        self._pending = None
        if not written:
            logger.info("usage flush %s was already in the store; not added again", batch.id)
        return True

    async def _write(self, batch: _Batch) -> bool:
        """Claim the batch's id and add its counts, all in one transaction (a failure writes
        none of it); False, writing nothing, when the id is claimed already: an earlier write
        of this batch committed and its answer was lost. On PostgreSQL a claim by a write
        still in flight makes this one wait for its outcome."""
        at = now()
        rows = [
            {
                "key_id": k,
                "bucket": datetime.fromtimestamp(b * 60, UTC),
                **dict(zip(_FIELDS, c, strict=True)),
            }
            for (k, b), c in batch.counts.items()
        ]
        prune = time.monotonic() >= self._prune_at
        async with self.store.engine.begin() as conn:
            claimed = await conn.execute(_claim(self.store, batch.id, at))
            if claimed.rowcount != 1:
                return False
            for start in range(0, len(rows), CHUNK_ROWS):
                await conn.execute(_upsert(self.store, rows[start : start + CHUNK_ROWS]))
            if prune:
                flushes = schema.usage_flushes
                await conn.execute(delete(flushes).where(flushes.c.at < at - CLAIMS_KEPT))
        if prune:
            self._prune_at = time.monotonic() + PRUNE_EVERY_S
        return True


def _insert(store: StateStore, table: Table) -> sqlite.Insert | postgresql.Insert:
    """The dialect's INSERT, which has ON CONFLICT (both dialects)."""
    from sqlalchemy.dialects import postgresql, sqlite

    return sqlite.insert(table) if store.target.is_sqlite else postgresql.insert(table)


def _claim(store: StateStore, flush_id: str, at: datetime) -> Executable:
    """INSERT the flush id unless it is there: one row inserted, or none when it was claimed
    (``rowcount``; not RETURNING, which SQLite has only since 3.35)."""
    table = schema.usage_flushes
    claim = _insert(store, table).values(id=flush_id, at=at)
    return claim.on_conflict_do_nothing(index_elements=[table.c.id])


def _upsert(store: StateStore, rows: list[dict[str, object]]) -> Executable:
    """One INSERT ... ON CONFLICT DO UPDATE adding to existing rows."""
    table = schema.usage
    upsert = _insert(store, table).values(rows)
    return upsert.on_conflict_do_update(
        index_elements=[table.c.key_id, table.c.bucket],
        set_={f: table.c[f] + upsert.excluded[f] for f in _FIELDS},
    )


async def usage_since(store: StateStore, since: datetime | None) -> list[UsageTotals]:
    """Totals per key since ``since`` (None: all time), with the key's name when known."""
    table, keys = schema.usage, schema.api_keys
    sums = [func.sum(table.c[f]).label(f) for f in _FIELDS]
    query = (
        select(table.c.key_id, keys.c.name, *sums)
        .select_from(table.outerjoin(keys, keys.c.id == table.c.key_id))
        .group_by(table.c.key_id, keys.c.name)
        .order_by(table.c.key_id)
    )
    if since is not None:
        query = query.where(table.c.bucket >= since.replace(second=0, microsecond=0))
    async with store.engine.connect() as conn:
        rows = await conn.execute(query)
        return [
            UsageTotals(r.key_id, r.name, *(int(getattr(r, f) or 0) for f in _FIELDS)) for r in rows
        ]
