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
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
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
        self._cond = threading.Condition(threading.Lock())
        self._used = 0
        self._running = 0
        self._waiting: deque[object] = deque()

    @property
    def running(self) -> int:
        """Passes in flight now."""
        return self._running

    @contextmanager
    def forward(self, threads: int) -> Iterator[bool]:
        need = max(1, min(threads, self.capacity))
        with self._cond:
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
        try:
            yield alone
        finally:
            with self._cond:
                self._used -= need
                self._running -= 1
                if self._waiting:
                    self._cond.notify_all()
