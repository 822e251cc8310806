"""What a local model's queue carries, and what a request gets back from it.

A payload is an input tokenized before it queued (``Encoded``) or a short text queued as it is
(``Deferred``), which the inference thread tokenizes with the rest of its batch in one call
(``resolve``) just before the forward pass. ``Processed`` is one request's results with the
instants that time its stages.
"""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from embedplex.backends.tokenizer import Encoded, TextTokenizer, TruncationDirection
from embedplex.batching import Item
from embedplex.core.errors import EmbedplexError
from embedplex.core.spend import bounded_tokens, estimated_tokens
from embedplex.core.types import Timings

R = TypeVar("R")


@dataclass(slots=True)
class Deferred:
    """A short text queued untokenized: the inference thread tokenizes its batch at once."""

    text: str
    index: int  # its position in its request, for error messages
    truncate: bool
    direction: TruncationDirection
    cost: int  # estimated tokens; the real count once its batch has tokenized it (0: failed)
    bound: int  # what a key's tpm reserves for it: at least its count (core/spend.py)


Payload = Encoded | Deferred
# A placeholder while a batch is being resolved (never handed to a caller).
_UNRESOLVED: Any = object()


def deferred(
    texts: list[str],
    truncate: bool,
    direction: TruncationDirection,
    cap: int,
    picked: list[int] | None = None,
) -> list[Deferred]:
    """``texts`` queued untokenized; ``cap``: the model's ``max_input_length``; ``picked``:
    only these positions of ``texts`` (their positions name them in errors)."""
    # The cost is a guess until the thread tokenizes (about 4 characters a token); it only
    # groups similar lengths and sizes the batch, and _infer splits a batch it underrated.
    # A key's tpm reserves the bound instead (one token a character: non-English text
    # counts up to 4 times the guess), settled to the real count at the finish.
    ks = range(len(texts)) if picked is None else picked
    return [
        Deferred(
            texts[k],
            k,
            truncate,
            direction,
            min(cap, estimated_tokens(len(texts[k]))),
            min(cap, bounded_tokens(len(texts[k]))),
        )
        for k in ks
    ]


def resolve(tokenizer: TextTokenizer, payloads: list[Payload]) -> list[Encoded | EmbedplexError]:
    """Tokenize the deferred texts of a batch: one tokenizer call per truncation setting."""
    out: list[Encoded | EmbedplexError] = [
        p if isinstance(p, Encoded) else _UNRESOLVED for p in payloads
    ]
    groups: dict[tuple[bool, TruncationDirection], list[int]] = {}
    for k, p in enumerate(payloads):
        if isinstance(p, Deferred):
            groups.setdefault((p.truncate, p.direction), []).append(k)
    for (truncate, direction), ks in groups.items():
        texts = [typing.cast(Deferred, payloads[k]) for k in ks]
        done = tokenizer.encode_each(
            [d.text for d in texts],
            [d.index for d in texts],
            truncate=truncate,
            direction=direction,
        )
        for k, d, e in zip(ks, texts, done, strict=True):
            out[k] = e
            d.cost = e.cost if isinstance(e, Encoded) else 0
    return out


@dataclass(slots=True)
class Processed(Generic[R]):
    """What one request's inputs came back as, with the instants that time them."""

    results: list[R]
    items: list[Item[Payload, R]]
    start: float
    tokenized: float

    def timings(self) -> Timings:
        """``items`` may include inputs other callers queued (joined in flight): their stamps
        still say when this caller's result was made; none at all when every input was cached."""
        end = time.perf_counter()
        items = self.items
        if not items:
            return Timings(
                tokenization=(self.tokenized - self.start) * 1000, total=(end - self.start) * 1000
            )
        if len(items) == 1:  # most requests: no generators to take the max over one item
            item = items[0]
            queue = item.started_at - item.enqueued_at
            inference = item.finished_at - item.started_at
        else:
            queue = max(i.started_at - i.enqueued_at for i in items)
            inference = max(i.finished_at - i.started_at for i in items)
        return Timings(
            tokenization=(self.tokenized - self.start) * 1000,
            queue=queue * 1000,
            inference=inference * 1000,
            total=(end - self.start) * 1000,
        )
