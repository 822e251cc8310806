"""The one cost model of a local model's batches: padded tokens per forward pass.

A backend pads every row of a batch to its longest, so a batch costs ``longest x rows`` tokens
whatever its rows' own lengths. ``TokenBudget`` is decided once per model, from the settings and
the backend's pass limit (``TokenBudget.decide``), and every place that sizes a batch asks it:

- the queue (``LengthBucketQueue``) cuts batches whose estimated padded size fits;
- the local model's inference thread, once deferred texts are tokenized and the real lengths are
  known, runs a batch that no longer fits in length-sorted pieces that each do (``run_in_pieces``);
- the backend runs whatever it is handed: it declares its pass limit (``run_tokens``) and applies
  no budget of its own;
- the model's ``ModelInfo`` (TEI ``/info``) reports the budget in force.

Remote providers are not costed here: their lanes (``FifoQueue``) count a sum of costs, one per
input, against a request-size limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def padded_cost(lengths: Sequence[int]) -> int:
    """Tokens a batch occupies once padded to its longest member (0 for no rows)."""
    return max(lengths) * len(lengths) if lengths else 0


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """What one batch of a local model may hold.

    ``tokens``: padded tokens per batch (None: no token budget); ``items``: rows per batch. A row
    longer than ``tokens`` on its own is still served, alone: the budget bounds what rows are
    padded to together, never which inputs are accepted (``max_input_length`` does that).
    """

    tokens: int | None
    items: int

    def __post_init__(self) -> None:
        if self.items < 1 or (self.tokens is not None and self.tokens < 1):
            raise ValueError(f"a batch budget needs items >= 1 and tokens >= 1, got {self}")

    @classmethod
    def decide(
        cls, *, max_batch_tokens: int, max_batch_requests: int, run_tokens: int | None
    ) -> TokenBudget:
        """The budget in force: the settings, cut to one forward pass of the backend.

        A backend whose passes are fastest at a bounded size (``run_tokens``; ONNX on a CPU) is
        handed batches of one pass, so that the queue groups lengths across everything waiting
        rather than within one oversized batch, and each inference stream takes the next pass
        as it frees (docs/architecture.md, "A batch is one forward pass"). A backend with no
        such limit (torch) takes the setting.
        """
        tokens = max_batch_tokens if run_tokens is None else min(max_batch_tokens, run_tokens)
        return cls(tokens=tokens, items=max_batch_requests)

    def fits(self, longest: int, count: int) -> bool:
        """Whether ``count`` rows padded to ``longest`` tokens make one batch."""
        return count <= self.items and (self.tokens is None or longest * count <= self.tokens)

    def pieces(self, lengths: Sequence[int]) -> list[list[int]]:
        """Split rows (given by their lengths) into batches that each fit; row indices.

        The usual case is one piece, the rows in their own order. Otherwise the rows are sorted
        by length and cut greedily, so that each piece is padded only to lengths like its own;
        a row that alone passes the budget is a piece by itself.
        """
        if not lengths:
            return []
        if self.fits(max(lengths), len(lengths)):
            return [list(range(len(lengths)))]
        pieces: list[list[int]] = []
        piece: list[int] = []
        for k in sorted(range(len(lengths)), key=lengths.__getitem__):
            # Sorted ascending, so the row joining is the piece's longest.
            if piece and not self.fits(lengths[k], len(piece) + 1):
                pieces.append(piece)
                piece = []
            piece.append(k)
        pieces.append(piece)
        return pieces

    def run_in_pieces(
        self,
        rows: Sequence[T],
        lengths: Sequence[int],
        run: Callable[[list[T]], Sequence[R]],
    ) -> list[R]:
        """``run`` each piece of ``rows``; the results come back in the rows' order."""
        if lengths and self.fits(max(lengths), len(lengths)):
            # The usual batch, one piece in the rows' own order: no indices to map back (this
            # runs in the inference thread, holding the GIL, once per batch).
            return _checked(run(list(rows)), len(rows))
        out: list[Any] = [None] * len(rows)
        for piece in self.pieces(lengths):
            results = _checked(run([rows[k] for k in piece]), len(piece))
            for k, result in zip(piece, results, strict=True):
                out[k] = result
        return out


def _checked(results: Sequence[R], rows: int) -> list[R]:
    if len(results) != rows:
        raise ValueError(f"a run of {rows} rows returned {len(results)} results")
    return list(results)
