"""Failed attempts per client address: a throttle for guessing the admin secret.

The same GCRA as a key's limits (``gcra.py``), one timestamp per client address: each failure
moves the address's theoretical arrival time on by ``window_s / burst``; an address whose
failures fill the bucket (``burst`` of them within ``window_s``) is throttled until one has
drained, so a guesser gets ``burst`` tries at once, then one every ``window_s / burst``
seconds. Only failures count: a correct secret, or no attempt at all, costs nothing, and a
throttled attempt is refused without looking at its secret (checking it would tell a guesser
which guess was right, throttled or not). Per address, so that a flood from one client does not
lock out an administrator elsewhere (docs/security.md).

Memory is bounded: at ``max_clients`` addresses, the least recently failed are forgotten, a
tenth of the table at once (each failure moves its address to the end, so a throttled guesser
is not flushed out by a spray of new addresses before the addresses that went quiet, and a full
table costs no scan per failure). A guesser with that many addresses can still flush it: the
secret's minimum length, not this, is what makes spraying from many addresses hopeless. The
admin routes' checks run on the event loop and in FastAPI's threadpool, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

BURST = 10  # failed attempts an address may make at once ...
WINDOW_S = 60.0  # ... per this many seconds (then one every WINDOW_S / BURST)
MAX_CLIENTS = 10_000  # addresses remembered at most


class FailureThrottle:
    """``wait(client)`` before checking a secret, ``failed(client)`` when it was wrong.

    A success forgives nothing: failures drain with time alone, so a correct secret sent from
    the same address (one proxy in front of many clients) cannot reset a guesser's count.
    """

    def __init__(
        self,
        burst: int = BURST,
        window_s: float = WINDOW_S,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or window_s <= 0 or max_clients < 1:
            raise ValueError("burst and max_clients must be at least 1, window_s positive")
        self.interval = window_s / burst
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        # Per address, least recently failed first: when its bucket is empty again.
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now (one dict lookup)."""
        tat = self._tat.get(client)
        if tat is None:
            return 0.0
        return max(tat - self._clock() - self.window_s + self.interval, 0.0)

    def failed(self, client: str) -> bool:
        """Count one failed attempt of ``client``; True when it is throttled from now on."""
        now = self._clock()
        with self._lock:
            tat = self._tat.get(client)
            if tat is None:
                if len(self._tat) >= self.max_clients:
                    self._forget()
                tat = now
            else:
                self._tat.move_to_end(client)
            tat = max(tat, now) + self.interval
            self._tat[client] = tat
        return tat - now > self.window_s - self.interval + 1e-9

    def _forget(self) -> None:
        """Drop the least recently failed tenth of the table (at least one address)."""
        for _ in range(max(1, self.max_clients // 10)):
            self._tat.popitem(last=False)
