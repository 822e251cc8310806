"""What a call to a Ray-served model reserves of its key's tokens per minute (docs/limits.md).

A replica queues its inputs in another process, where the request's ``Spend`` does not reach,
so the gateway reserves for the whole call before making it: one ``RayCall`` per request,
queued through ``Spend.queue`` as a local model's batcher items are (the same reservation,
the same 429 before any call). The replica's tokenizer is not here, so a text reserves a local
deferred text's bound (one token a character plus 2, at most the model's input length) and is
charged, when its request ends without an answer after the call was sent, the estimate
(characters / 4 + 2, capped alike); token ids count as given (capped). An answer is charged
what the replica counted (its ``prompt_tokens``), as a local model's.
"""

from __future__ import annotations

import asyncio
import time
import typing
from dataclasses import dataclass

from embedplex.core.errors import UpstreamTimeoutError
from embedplex.core.spend import bounded_tokens, estimated_tokens
from embedplex.core.types import EmbedRequest, ModelInfo, RerankRequest
from embedplex.models.config import ModelConfig


@dataclass(slots=True)
class RayCall:
    """One request's call to a replica, as ``Spend`` reads a queued input (``Queued``; it is
    its own payload): ``cost``, what it is charged if its request ends without an answer once
    the call was sent; ``bound``, what it reserves; ``started_at``, when the call was sent
    (0: not yet); ``future``, how it ended."""

    cost: int
    bound: int
    future: asyncio.Future[None]
    started_at: float = 0.0

    @property
    def payload(self) -> RayCall:
        return self

    def sent(self) -> None:
        if not self.started_at:  # a retry is the same call
            self.started_at = time.monotonic()

    def ended(self, error: BaseException | None) -> None:
        """The call answered (``error`` None), failed, or its caller left. A caller that left
        (cancelled) or whose deadline passed (504) had its call cancelled in Ray, perhaps after
        it ran: it holds, and is charged, as a local model's running batch is. A failure (Ray's,
        a stuck replica's 503, or an error the replica answered: a bad input, its queue timed
        out) did the key no work: its reservation comes back."""
        future = self.future
        if future.done():
            return
        if error is None:
            future.set_result(None)
        elif isinstance(error, asyncio.CancelledError | UpstreamTimeoutError):
            future.cancel()
        else:
            future.set_exception(error)
            future.exception()  # read: nobody awaits it (no "never retrieved" log)


def ray_call(request: object, info: ModelInfo, config: ModelConfig) -> RayCall:
    """The ``RayCall`` of an ``embed``, ``embed_all`` or ``rerank`` request."""
    cap = info.max_input_length
    cost = bound = 0
    if isinstance(request, RerankRequest):
        query = len(request.query)
        for text in request.texts:
            chars = query + len(text)
            cost += min(cap, estimated_tokens(chars))
            bound += min(cap, bounded_tokens(chars + 1))  # a pair has one more separator
    elif (embed := typing.cast(EmbedRequest, request)).is_tokens:
        ids = typing.cast(list[list[int]], embed.inputs)
        cost = bound = sum(min(cap, len(seq)) for seq in ids)
    else:
        prompt = len(_prompt(embed, info, config) or "")
        for text in typing.cast(list[str], embed.inputs):
            chars = prompt + len(text)
            cost += min(cap, estimated_tokens(chars))
            bound += min(cap, bounded_tokens(chars))
    return RayCall(cost, bound, asyncio.get_running_loop().create_future())


def _prompt(request: EmbedRequest, info: ModelInfo, config: ModelConfig) -> str | None:
    """The prompt the replica prepends, as far as the gateway knows it: the request's, or the
    table's default. A default named by the model's own files (sentence-transformers'
    ``default_prompt_name``) is only in the replica: not counted (the answer's settle charges
    its tokens)."""
    if request.prompt is not None:
        return request.prompt
    if request.prompt_name is not None:
        return info.prompts.get(request.prompt_name)
    if config.default_prompt is not None:
        return config.default_prompt
    if config.default_prompt_name is not None:
        return info.prompts.get(config.default_prompt_name)
    return None
