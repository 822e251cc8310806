"""Per-key usage: counted in memory per request, written to the store in batches.

``UsageMeter.add`` is called once per finished request (``api/observe.py``) and only adds to a
dict; every ``flush_s`` the counts are written, in one transaction, as upserts of up to
``CHUNK_ROWS`` (key, minute) rows each, so the store sees a few statements every several
seconds however busy the server is. A failed write keeps its counts for the next flush; a
crash loses at most ``flush_s`` of counts. A flush is never abandoned while its write may still
commit (that counted it twice): it waits for the driver's answer, each step of which
``state_timeout_s`` bounds (docs/keys.md). ``close`` (a SIGTERM) lets a flush under way
finish, then writes the rest; counts that still cannot be written are logged as lost (how many
requests), never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Executable, func, select

from embedplex.state import schema
from embedplex.state.store import StateStore

logger = logging.getLogger(__name__)

_FIELDS = ("requests", "inputs", "tokens", "refusals")

# Rows per INSERT: each row binds 6 parameters and asyncpg takes at most 32,767 per statement,
# so one statement for a whole flush failed past ~5,460 (key, minute) rows, and kept failing
# as each failed flush joined the next. 1,000 rows stay far under both dialects' limits.
CHUNK_ROWS = 1000


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
        self._counts: dict[tuple[str, int], list[int]] = {}  # (key id, minute since epoch)
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
        cancelled: its counts are out of ``_counts`` while it writes, and a cancelled write
        would have taken them with it. Past a second bound it is cancelled, and ``flush``
        puts its counts back even then."""
        if self._task is not None:
            self._stopping.set()
            done, _ = await asyncio.wait([self._task], timeout=2 * self.store.timeout_s)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self.flush()
        if self._counts:
            lost = sum(c[0] for c in self._counts.values())
            logger.warning(
                "usage of %d requests (%d key-minutes) lost: the state store could not be "
                "written before shutdown",
                lost,
                len(self._counts),
            )
            self._counts = {}

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_s)
            if not self._stopping.is_set():
                await self.flush()

    async def flush(self) -> None:
        counts, self._counts = self._counts, {}
        if not counts:
            return
        rows = [
            {
                "key_id": k,
                "bucket": datetime.fromtimestamp(b * 60, UTC),
                **dict(zip(_FIELDS, c, strict=True)),
            }
            for (k, b), c in counts.items()
        ]
        try:
            # Not ``store.bounded``: a write given up on at the bound could still commit
            # (SQLite waiting out a lock, a COMMIT the server already has), and its counts,
            # kept for the next flush, would be written twice. The driver bounds each step
            # instead (connect, pool wait, each statement: ``state_timeout_s``; SQLite's busy
            # timeout below it), and its failure is a rollback.
            await self._write(rows)
        except Exception as exc:
            logger.warning("usage flush failed (%s); kept for the next one", type(exc).__name__)
            self._keep(counts)
        except BaseException:  # cancelled: the counts taken out go back all the same
            self._keep(counts)
            raise

    def _keep(self, counts: dict[tuple[str, int], list[int]]) -> None:
        for key, c in counts.items():
            mine = self._counts.setdefault(key, [0, 0, 0, 0])
            for i, value in enumerate(c):
                mine[i] += value

    async def _write(self, rows: list[dict[str, object]]) -> None:
        # Every chunk in one transaction: a failure keeps all of them for the next flush,
        # and none is added twice.
        async with self.store.engine.begin() as conn:
            for start in range(0, len(rows), CHUNK_ROWS):
                await conn.execute(_upsert(self.store, rows[start : start + CHUNK_ROWS]))


def _upsert(store: StateStore, rows: list[dict[str, object]]) -> Executable:
    """One INSERT ... ON CONFLICT DO UPDATE adding to existing rows (both dialects have it)."""
    from sqlalchemy.dialects import postgresql, sqlite

    table = schema.usage
    if store.target.is_sqlite:
        lite = sqlite.insert(table).values(rows)
        return lite.on_conflict_do_update(
            index_elements=[table.c.key_id, table.c.bucket],
            set_={f: table.c[f] + lite.excluded[f] for f in _FIELDS},
        )
    pg = postgresql.insert(table).values(rows)
    return pg.on_conflict_do_update(
        index_elements=[table.c.key_id, table.c.bucket],
        set_={f: table.c[f] + pg.excluded[f] for f in _FIELDS},
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
