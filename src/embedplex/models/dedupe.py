"""Identical inputs in flight share one slot in the batch and one result.

A ``Flight`` is one queued or running ``Item`` registered under what its result depends on.
The caller that queued it (the leader) waits on the item's own future, exactly as without
dedupe, so an input nobody shares costs one registry entry and nothing more. A caller that
finds the key registered joins: it gets a future of its own, resolved from the item's outcome.

Joining never makes a caller wait longer than a copy of its own would: a running item may be
joined by anyone, a queued one (under a fair queue, which serves keys in turn and interactive
work first) only by callers of its own key at the same or a lower priority (``serves``). A
caller that may not join queues its own copy, which its own key's next callers join.

Leaving: a joiner that leaves (a disconnect, a deadline) gives up its share only. When the
leader leaves, its await cancels the item; if joiners still wait, the item is handed to them
(``Requeue``): a local model's running item keeps its batch, whose result then reaches them,
and a queued one is queued again (the same payload, at the back of the queue), so no caller
ever fails because another left. The work is dropped once every caller has left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from embedplex.batching import Item
from embedplex.core.errors import EmbedplexError
from embedplex.core.tenant import Priority, Tenant

R = TypeVar("R")

Flights = dict[Hashable, "Flight[Any]"]
# Hand a cancelled item's work to its joiners (its leader left): queue its payload again for the
# tenant given, or (a local model) the same item with a new future if its batch is running.
Requeue = Callable[[Item[Any, Any], Tenant], Item[Any, Any]]


class Flight(Generic[R]):
    """One computation, registered under ``key`` until it is done or dropped."""

    __slots__ = (
        "item",
        "key",
        "leader",
        "live",
        "registry",
        "requeue",
        "stored",
        "tenant",
        "waiters",
    )

    def __init__(
        self,
        registry: Flights,
        key: Hashable,
        item: Item[Any, R],
        requeue: Requeue,
        tenant: Tenant,
        *,
        fair: bool = False,
    ) -> None:
        """``fair``: the item's queue serves keys in turn and lanes in order (``serves``); the
        flight then takes the registry's place from one its own tenant may not join."""
        self.registry = registry
        self.key = key
        self.item = item
        self.requeue = requeue
        self.tenant = tenant
        self.leader = True  # the caller that queued it still waits on the item's future
        self.live = 0  # joiners still waiting
        self.stored = False  # its result went to the cache (by the first caller that could)
        self.waiters: list[asyncio.Future[R]] | None = None
        # One submitted while we tokenized stays the one others join, unless our tenant could
        # not join it: then ours is the one our tenant's next callers join.
        current = registry.get(key)
        if current is None or (fair and not current.serves(tenant, fair)):
            registry[key] = self

    def serves(self, tenant: Tenant, fair: bool) -> bool:
        """Whether a caller of ``tenant`` joining this flight is answered no later than a copy
        of its own would be. Running: yes. Queued in a fair queue (``fair``): only if it is the
        same key's (another key's turn may come after this key's) and not in a lower lane than
        the caller's (interactive work never waits for batch work). A plain queue serves in
        arrival order: an item queued earlier is never served after a copy queued now."""
        item = self.item
        if item.started_at or not fair:
            return True
        if item.tenant_key != tenant.key_id:
            return False
        return item.priority is not Priority.BATCH or tenant.priority is Priority.BATCH

    def join(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[R]:
        """A future of the joining caller's own that gets this input's outcome."""
        waiter: asyncio.Future[R] = loop.create_future()
        if self.waiters is None:
            self.waiters = []
            self.item.future.add_done_callback(self._done)
        self.waiters.append(waiter)
        self.live += 1
        return waiter

    def leave(self) -> None:
        """A joiner gave up its wait: with the leader gone too, the last one out drops it."""
        self.live -= 1
        if self.live <= 0 and not self.leader and not self.item.future.done():
            self._unregister()  # nobody may join work that is being dropped
            self.item.future.cancel()

    def release(self) -> None:
        """The leader is done waiting (answered, failed or gone)."""
        self.leader = False
        if self.live <= 0:
            if not self.item.future.done():
                self.item.future.cancel()
            self._unregister()

    def _unregister(self) -> None:
        if self.registry.get(self.key) is self:
            del self.registry[self.key]

    def _done(self, future: asyncio.Future[R]) -> None:
        if future is not self.item.future:  # an item queued again since: it answers
            return
        if future.cancelled():  # only the leader's leaving cancels it while joiners wait
            if self.live > 0:
                try:  # its running batch or a new place in the queue (``Requeue``)
                    self.item = self.requeue(self.item, self.tenant)
                except EmbedplexError as exc:
                    self._unregister()
                    self._settle(exc, None)
                    return
                self.leader = False
                self.item.future.add_done_callback(self._done)
                return
            self._unregister()
            return
        self._unregister()
        error = future.exception()
        self._settle(error, None if error is not None else future.result())

    def _settle(self, error: BaseException | None, result: R | None) -> None:
        for waiter in self.waiters or ():
            if waiter.done():
                continue
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)  # type: ignore[arg-type]  # set when no error


# Whether a caller may join a flight (a remote provider's rule: ``providers/cached.py``).
Joinable = Callable[["Flight[Any]"], bool]


class Sharing(Generic[R]):
    """One caller's inputs against a registry of flights: which to queue, which to join, then
    the wait for all of them, and the leaving (``finish``, always, in a ``finally``).

    ``keys``: each input's key; identical keys of one caller share one slot. ``joinable``: a
    flight found registered is joined only if it says so (default: always); otherwise the input
    is queued afresh. After ``__init__``, ``fresh`` holds the positions to queue; ``lead`` takes
    their items. Remote providers use it (``providers/runtime.py``); ``models/local.py`` keeps
    its own copy of the same steps, interleaved with admission and tokenizing.
    """

    __slots__ = ("flights", "fresh", "joined", "keys", "own", "shared", "slot_of", "slots", "waits")

    def __init__(
        self, flights: Flights, keys: Sequence[Hashable], joinable: Joinable | None = None
    ) -> None:
        self.flights = flights
        self.keys = keys
        self.fresh: list[int] = []  # positions to queue: the first of each key nobody computes
        self.own: list[Flight[R]] = []
        self.joined: list[tuple[Flight[R], asyncio.Future[R]]] = []
        self.waits: list[asyncio.Future[R] | None] = []  # per distinct key
        self.shared: list[Flight[R] | None] = []  # per distinct key: the flight that makes it
        self.slots: list[int] = []  # per input: its index in ``waits``
        self.slot_of: dict[Hashable, int] = {}
        slot_of, slots = self.slot_of, self.slots
        for k, key in enumerate(keys):
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = len(self.waits)
                self._plan(key, k, joinable)
            slots.append(slot)

    def _plan(self, key: Hashable, k: int, joinable: Joinable | None) -> None:
        flight = self.flights.get(key)
        if flight is not None and (joinable is None or joinable(flight)):
            waiter = flight.join(asyncio.get_running_loop())
            self.joined.append((flight, waiter))
            self.waits.append(waiter)
        else:
            flight = None
            self.fresh.append(k)
            self.waits.append(None)
        self.shared.append(flight)

    @property
    def joins(self) -> int:
        """Inputs that are not queued: they joined a flight, or an identical input of the same
        caller (for the dedupe counts)."""
        return len(self.keys) - len(self.fresh)

    def lead(self, items: Sequence[Item[Any, R]], requeue: Requeue, tenant: Tenant) -> None:
        """Register the items queued for ``fresh`` (in order); this caller waits on them."""
        keys = self.keys
        slot_of = self.slot_of
        for k, item in zip(self.fresh, items, strict=True):
            flight = Flight(self.flights, keys[k], item, requeue, tenant)
            self.own.append(flight)
            slot = slot_of[keys[k]]
            self.shared[slot] = flight
            self.waits[slot] = item.future  # the leader waits on its item itself

    async def wait(self) -> list[R]:
        """Every input's result, in input order (call ``finish`` whatever way this ends)."""
        ready: list[asyncio.Future[R]] = self.waits  # type: ignore[assignment]  # all set now
        # Most requests have one input: skip gather's extra future and callbacks.
        distinct = [await ready[0]] if len(ready) == 1 else list(await asyncio.gather(*ready))
        return [distinct[s] for s in self.slots]

    def finish(self) -> None:
        """Leave every flight: ours go once no joiner waits on them (queued again for those
        that do, if we cancelled them), joined ones once their last caller has left."""
        for flight in self.own:
            flight.release()
        for flight, waiter in self.joined:
            if not waiter.done() or waiter.cancelled():
                flight.leave()

    def items(self) -> list[Item[Any, R]]:
        """The items that made this caller's results (its own and those it joined)."""
        return [f.item for f in self.shared if f is not None]
