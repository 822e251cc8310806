"""An exact, byte-bounded LRU held in this process.

Keys are the Python objects the caller builds (tuples of text and options): a lookup hashes
them (a string caches its own hash) and a hash hit is confirmed by equality, so two different
inputs can never share an entry, and no digest is computed on the hot path. Every entry is
charged the bytes its owner says it holds; past ``max_bytes`` the least recently used go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class MemoryCache(Generic[V]):
    """``get`` marks an entry as recently used; ``put`` evicts the oldest past the bound.

    Not thread-safe: only the event loop touches it.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1 (0 turns the cache off upstream)")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Keep ``value`` charged ``size`` bytes; one larger than the whole bound is not kept."""
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        entries = self._entries
        while self.bytes > self.max_bytes:
            _, (_, freed) = entries.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
