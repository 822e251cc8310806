"""The batching engine: one queue owner per (model or provider, grouping key)."""

from embedplex.batching.batcher import (
    Batcher,
    BatchObserver,
    BatchPolicy,
    BatchStats,
    NullObserver,
    RunBatch,
)
from embedplex.batching.cost import TokenBudget, padded_cost
from embedplex.batching.item import Item
from embedplex.batching.queues import BatchQueue, FifoQueue, LengthBucketQueue

__all__ = [
    "BatchObserver",
    "BatchPolicy",
    "BatchQueue",
    "BatchStats",
    "Batcher",
    "FifoQueue",
    "Item",
    "LengthBucketQueue",
    "NullObserver",
    "RunBatch",
    "TokenBudget",
    "padded_cost",
]
