"""The gate every CPU forward pass goes through: cores held, and whether a pass is alone.

One gate is shared by every local model of a process (``models/layout.py`` builds it), so that
several models under load together never run more intra-op threads than the layout gives the
CPU, and so that "no other pass in flight" (the ONNX solo session's test) means no other pass in
any model. A pass takes ``threads`` units of ``capacity`` (cores) for its duration; passes wait
in arrival order, so a pass that needs more threads is not starved by smaller ones.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import AbstractContextManager
from typing import Protocol


class PassGate(Protocol):
    """What a backend holds around one forward pass."""

    def forward(self, threads: int) -> AbstractContextManager[bool]:
        """Hold ``threads`` cores while the block runs; yields whether no other pass was in
        flight (in any model sharing the gate) when this one started."""
        ...


class CoreGate:
    """A FIFO counting gate over ``capacity`` cores (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a core gate needs a capacity of at least 1")
        self.capacity = capacity
        # The Condition's own lock, taken directly: ``with`` on the lock is a C call, on the
        # Condition a Python one, and every forward pass takes it twice holding the GIL.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._used = 0
        self._running = 0
        self._waiting: deque[object] = deque()

    @property
    def running(self) -> int:
        """Passes in flight now."""
        return self._running

    def forward(self, threads: int) -> _Pass:
        """Hold ``threads`` cores (at least one, at most ``capacity``) for the ``with`` block;
        it is given whether no other pass was in flight when this one started."""
        return _Pass(self, max(1, min(threads, self.capacity)))

    def _enter(self, need: int) -> bool:
        with self._lock:
            if self._waiting or self._used + need > self.capacity:
                ticket = object()
                self._waiting.append(ticket)
                while self._waiting[0] is not ticket or self._used + need > self.capacity:
                    self._cond.wait()
                self._waiting.popleft()
                self._cond.notify_all()  # the next in line may fit beside this one
            self._used += need
            alone = self._running == 0
            self._running += 1
            return alone

    def _leave(self, need: int) -> None:
        with self._lock:
            self._used -= need
            self._running -= 1
            if self._waiting:
                self._cond.notify_all()


class _Pass:
    """One pass through a ``CoreGate``: a plain context manager, where ``@contextmanager``
    would build a generator and its wrapper for every forward pass."""

    __slots__ = ("_gate", "_need")

    def __init__(self, gate: CoreGate, need: int) -> None:
        self._gate = gate
        self._need = need

    def __enter__(self) -> bool:
        return self._gate._enter(self._need)

    def __exit__(self, *exc: object) -> None:
        self._gate._leave(self._need)
