"""Fair shares at admission: one key cannot take all of a model's room.

A model's room is bounded twice (docs/configuration.md): requests in flight
(``max_concurrent_requests``) and inputs queued (``max_queue_size``). Taken first come, first
served, one key with many clients holds all of both, and every other key's request is refused
(429) before the fair queue (``fair.py``), which would have served it next, ever sees it. So
once a cap is more than ``SHARE_AT`` taken, a key that holds its fair share already is refused
(429, ``Retry-After: 1``), and the rest stays for the others (docs/scheduling.md):

- The keys sharing a cap are those holding part of it now and those that asked for some in the
  last ``LINGER_S`` seconds (served or refused): a client sending one query at a time holds
  nothing between its queries, and a key refused because the cap was full must find room when
  it comes back a ``Retry-After`` later.
- A key's fair share is the cap times its weight over the weights of the keys sharing it, its
  own included (``Tenant.weight``, as the fair queue divides the model). Alone, a key's share
  is the whole cap.
- ``n`` units (one request, or a request's inputs) are refused by this rule when the cap would
  be past ``SHARE_AT`` with them and the key, holding some already, would hold more than its
  share. A key that holds nothing is refused only by the cap itself.

Deterministic (no random early drop) and cheap: below ``SHARE_AT`` it costs a counter and one
dict write per request; past it, a sum over the keys sharing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping

from embedplex.core.errors import OverloadedError
from embedplex.core.tenant import Tenant

# Past this part of a cap taken, a key holding its fair share is refused.
SHARE_AT = 0.75
# A key that asked for room counts as sharing the cap this long after (a Retry-After and then
# some): so a refused key finds room when it comes back, and a one-at-a-time client keeps it.
# A minute, not a few seconds: a key counts as sharing the cap between queries sent up to a
# minute apart (at 5 s, a key querying every 6 s met a flood holding the whole cap each time).
LINGER_S = 60.0
RETRY_AFTER_S = 1  # a slot frees in about a request's time: Retry-After as docs/api.md says

Key = str | None


class Sharing:
    """The keys that asked lately for room under one cap, with their weights."""

    def __init__(self, *, linger: float = LINGER_S, clock: Callable[[], float] | None = None):
        self.linger = linger
        self._clock = clock or time.monotonic
        self._seen: dict[Key, tuple[float, int]] = {}
        self._scan_at = 64  # keys remembered at which stale ones are dropped

    def asked(self, key: Key, weight: int) -> None:
        """``key`` asked for room now."""
        seen = self._seen
        seen[key] = (self._clock(), weight if weight > 1 else 1)
        if len(seen) > self._scan_at:  # amortized: keys are authenticated ids, but many
            self._forget(self._clock() - self.linger)
            self._scan_at = max(64, 2 * len(self._seen))

    def others(self, holders: Mapping[Key, int], key: Key) -> int:
        """The weight of the keys sharing the cap besides ``key``: ``holders`` (key to weight)
        and the keys that asked in the last ``linger`` seconds."""
        since = self._clock() - self.linger
        self._forget(since)
        total = sum(w for k, w in holders.items() if k != key)
        for k, (_, weight) in self._seen.items():
            if k != key and k not in holders:
                total += weight
        return total

    def _forget(self, since: float) -> None:
        stale = [k for k, (at, _) in self._seen.items() if at < since]
        for k in stale:
            del self._seen[k]


def past_share(
    *, cap: int, total: int, n: int, held: int, weight: int, others: Callable[[], int]
) -> float | None:
    """The key's fair share when ``n`` more units would take it past it (see the module
    docstring); None when the rule lets them in. ``others``: the weight of the other keys
    sharing the cap (asked only past ``SHARE_AT``)."""
    if not held or total + n <= cap * SHARE_AT:
        return None
    weight = max(1, weight)
    share = cap * weight / (weight + others())
    return share if held + n > share else None


def share_refusal(what: str, tenant: Tenant, held: int, share: float) -> OverloadedError:
    """The 429 of a key past its fair share of ``what`` ("requests in flight to model 'm'")."""
    who = f"API key {tenant.key_id}" if tenant.key_id is not None else "this caller"
    return OverloadedError(
        f"{who} holds {held} of the {what}, its fair share beside the other keys using it "
        f"(about {share:.0f}); retry shortly",
        retry_after=RETRY_AFTER_S,
    )


class Slots:
    """Requests in flight against one cap (a model's ``max_concurrent_requests``), per key.

    ``take`` admits a request (or raises ``OverloadedError``: the cap, or the key's fair share
    past ``SHARE_AT``), ``release`` ends it. ``full``: the message of the cap's refusal, given
    the requests in flight; ``what``: what the share refusal says a key holds part of.
    """

    def __init__(
        self,
        cap: int,
        *,
        full: Callable[[int], str],
        what: str,
        linger: float = LINGER_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.cap = cap
        self.total = 0
        self._full = full
        self._what = what
        self._held: Counter[Key] = Counter()
        self._weight: dict[Key, int] = {}
        self._sharing = Sharing(linger=linger, clock=clock)

    def held(self, key: Key) -> int:
        return self._held.get(key, 0)

    def check(self, tenant: Tenant, *, note: bool = True) -> None:
        """Raise ``OverloadedError`` unless ``tenant`` may take a slot now. ``note``: count its
        key among those sharing the cap (for a request bound for this model; not for the
        gateway's check of every model of a kind, whose request may name another)."""
        key = tenant.key_id
        if note:
            self._sharing.asked(key, tenant.weight)
        total = self.total
        cap = self.cap
        if total >= cap:
            raise OverloadedError(self._full(total), retry_after=RETRY_AFTER_S)
        held = self._held.get(key, 0)
        if not held or total + 1 <= cap * SHARE_AT:  # past_share's first test, without a call
            return
        share = past_share(
            cap=cap,
            total=total,
            n=1,
            held=held,
            weight=tenant.weight,
            others=lambda: self._sharing.others(self._weight, key),
        )
        if share is not None:
            raise share_refusal(f"{total} {self._what}", tenant, held, share)

    def take(self, tenant: Tenant, *, note: bool = True) -> None:
        """Admit one request of ``tenant`` (``check``, ``note`` as there), counted until
        ``release``."""
        self.check(tenant, note=note)
        key = tenant.key_id
        held = self._held
        held[key] = held.get(key, 0) + 1
        weight = tenant.weight
        self._weight[key] = weight if weight > 1 else 1
        self.total += 1

    def release(self, tenant: Tenant) -> None:
        key = tenant.key_id
        self.total -= 1
        left = self._held[key] - 1
        if left > 0:
            self._held[key] = left
        else:
            del self._held[key]
            self._weight.pop(key, None)
