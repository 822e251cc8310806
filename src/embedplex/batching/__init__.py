"""The batching engine: one queue owner per (model or provider, grouping key)."""

from embedplex.batching.admission import Slots
from embedplex.batching.batcher import (
    Batcher,
    BatchObserver,
    BatchPolicy,
    BatchStats,
    NullObserver,
    RunBatch,
)
from embedplex.batching.cost import TokenBudget, padded_cost
from embedplex.batching.fair import (
    DEFAULT_AGING,
    FairFifoQueue,
    FairLengthQueue,
    QueuePolicy,
    make_queue,
)
from embedplex.batching.item import Item
from embedplex.batching.queues import BatchQueue, FifoQueue, LengthBucketQueue

__all__ = [
    "DEFAULT_AGING",
    "BatchObserver",
    "BatchPolicy",
    "BatchQueue",
    "BatchStats",
    "Batcher",
    "FairFifoQueue",
    "FairLengthQueue",
    "FifoQueue",
    "Item",
    "LengthBucketQueue",
    "NullObserver",
    "QueuePolicy",
    "RunBatch",
    "Slots",
    "TokenBudget",
    "make_queue",
    "padded_cost",
]
