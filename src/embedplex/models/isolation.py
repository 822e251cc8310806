"""One input that breaks a forward pass fails its own request, not its batch-mates'.

Callers' inputs share batches, so a forward pass that raises (an input the model cannot take:
a sequence past the position table a model's files overstate, a token id past its vocabulary, an
allocation too large) would fail every request in the batch, most of them for no fault of their
own. ``isolating`` runs the rows again in halves, and the halves of the halves that fail, until
the rows that fail alone are found: those get a ``BackendError`` in their place (the batcher
fails that input's future alone), the rest get their results.

Bounded: at most ``4 * ceil(log2 n)`` extra passes for a batch of ``n`` rows (as the router's
split of an upstream's 400: ``providers/guard.py``), which finds up to about two bad rows in any
batch; when the budget is spent, the rows not yet cleared fail with the batch's error. A pass that
fails for every input (a broken model) thus costs a bounded number of quick failures, not one per
row. A backend's own ``BackendError`` (torch's out-of-memory) is split like any failure: a
smaller pass may fit. Our other errors (a dead backend, a watchdog: ``FatalBackendError``) are
never split: they are not about an input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from embedplex.core.errors import BackendError, EmbedplexError, FatalBackendError

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


def isolating(run: Callable[[list[T]], Sequence[R]], rows: list[T]) -> list[R | BaseException]:
    """``run(rows)``; if it raises, the results of the rows that run in smaller passes and an
    error in the place of each row that fails alone (or that the budget did not reach)."""
    try:
        return list(run(rows))
    except Exception as exc:
        if _kept(exc) or len(rows) == 1:
            raise
        first = exc
    search = _Search(run, 4 * math.ceil(math.log2(len(rows))), _error(first))
    out = search.halves(rows)
    failed = sum(isinstance(r, BaseException) for r in out)
    logger.warning(
        "a batch of %d failed (%s); run again in parts: %d of its inputs failed",
        len(rows),
        type(first).__name__,
        failed,
        exc_info=first,
    )
    return out


class _Search(Generic[T, R]):
    """The halving search of one failed batch, with its budget of passes."""

    def __init__(
        self, run: Callable[[list[T]], Sequence[R]], budget: int, error: BackendError
    ) -> None:
        self.run = run
        self.budget = budget
        self.error = error

    def halves(self, rows: list[T]) -> list[R | BaseException]:
        """``rows`` failed together: run each half (one row that failed alone fails)."""
        if len(rows) == 1:
            return [self.error]
        mid = len(rows) // 2
        return self.part(rows[:mid]) + self.part(rows[mid:])

    def part(self, rows: list[T]) -> list[R | BaseException]:
        if self.budget <= 0:
            return [self.error] * len(rows)
        self.budget -= 1
        try:
            return list(self.run(rows))
        except Exception as exc:
            if _kept(exc):
                raise
            if len(rows) == 1:
                self.error = _error(exc)
            return self.halves(rows)


def _kept(exc: Exception) -> bool:
    """Whether ``exc`` fails the whole batch as it is (ours, and not about an input)."""
    return isinstance(exc, EmbedplexError) and (
        isinstance(exc, FatalBackendError) or not isinstance(exc, BackendError)
    )


def _error(exc: Exception) -> BackendError:
    if isinstance(exc, BackendError):  # the backend's own words (out of memory) stand
        return exc
    return BackendError(f"inference failed ({type(exc).__name__}); see the server log")
