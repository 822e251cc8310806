"""Local models served through the batching engine: tokenizer -> batcher -> backend.

``LocalModel`` holds what every local model shares (admission, the tokenizer and inference
threads, the batcher, instrumentation, timings); ``LocalEmbeddingModel`` (``embedding.py``)
pools vectors and ``LocalRerankModel`` (``rerank.py``) scores (query, text) pairs. What the
queue carries is ``payloads.py``'s, the serving knobs ``options.py``'s, and
``load_local_model`` (``loading.py``) builds the right model from what its files say it is.
"""

from __future__ import annotations

import asyncio
import time
import typing
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from embedplex.backends.base import Backend, TokenBatch
from embedplex.backends.model_files import ModelSpec
from embedplex.backends.tokenizer import Encoded, TextTokenizer, tokenize_in_calling_thread
from embedplex.batching import Batcher, BatchObserver, Item, Slots, TokenBudget
from embedplex.core.cores import tokenizer_threads
from embedplex.core.deadline import REQUEST_DEADLINE, within
from embedplex.core.errors import EmbedplexError, QueueTimeoutError
from embedplex.core.spend import REQUEST_SPEND, Spend
from embedplex.core.tenant import ANONYMOUS, Tenant
from embedplex.core.types import ModelInfo
from embedplex.models.checks import check_size
from embedplex.models.dedupe import Flight, Flights
from embedplex.models.isolation import isolating
from embedplex.models.options import LocalModelOptions
from embedplex.models.payloads import Deferred, Payload, Processed, resolve
from embedplex.observability.tracing import current_span_context, request_stage_spans
from embedplex.serve.process_tuning import worker_pool

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from embedplex.observability import Telemetry

R = TypeVar("R")
# A placeholder while a batch runs (never handed to a caller).
_PENDING: Any = object()
# Per request on the event loop: C getters, not a comprehension's function and frame each.
_COST = attrgetter("cost")
_ITEM = attrgetter("item")


class LocalModel(Generic[R]):
    """Admission, threads, batcher and instrumentation shared by every local model."""

    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: TextTokenizer,
        backend: Backend,
        options: LocalModelOptions,
        *,
        observers: list[BatchObserver] | None = None,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.backend = backend
        self.options = options
        # The one batch budget in force: the queue cuts by it (the policy carries its numbers),
        # _infer splits by it, /info reports it.
        self.budget = TokenBudget(tokens=options.policy.max_cost, items=options.policy.max_items)
        self._observers = observers or []
        self._tracer: Tracer | None = None
        cap = options.max_concurrent_requests
        self._slots = Slots(
            cap,
            full=lambda n: f"{n} requests in flight (max_concurrent_requests is {cap})",
            what=f"requests in flight to model {options.name!r}",
        )
        self._infer_pool: ThreadPoolExecutor | None = None
        self._token_pool: ThreadPoolExecutor | None = None
        self._batcher: Batcher[Payload, R] | None = None
        self._flights: Flights = {}  # inputs queued or running, by what their result depends on
        self._admitted: Tenant | None = None  # the tenant ``admit`` noted last (``_take``)
        # Queued inputs are served by key and lane: joining one may wait longer (dedupe.py).
        self._fair = options.queue_policy == "fair"
        self._info = ModelInfo(
            name=options.name,
            model_id=spec.model_id,
            sha=spec.sha,
            backend=backend.name,
            device=backend.device,
            dtype=backend.dtype,
            dim=backend.dim,
            pooling=spec.pooling.value,
            max_input_length=spec.max_input_length,
            prompts=spec.prompts,
            kind=spec.kind.value,
            max_batch_tokens=self.budget.tokens,
            max_batch_requests=self.budget.items,
            max_concurrent_requests=options.max_concurrent_requests,
            max_client_batch_size=options.max_client_batch_size,
            auto_truncate=options.auto_truncate,
            id2label=spec.id2label or None,
            label2id=spec.label2id or None,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def instrument(self, telemetry: Telemetry) -> None:
        """Report batches to ``telemetry``'s metrics and spans (call before ``start``)."""
        if self._batcher is not None:
            raise RuntimeError("instrument the model before starting it")
        self._observers = [*self._observers, *telemetry.model_observers(self.options.name)]
        self._tracer = telemetry.tracer

    @property
    def batcher(self) -> Batcher[Payload, R]:
        if self._batcher is None:
            raise RuntimeError("model not started")
        return self._batcher

    async def start(self) -> None:
        if self.backend.device == "cpu":  # its passes take every core: no tokenizer thread pool
            tokenize_in_calling_thread()
        nice = self.options.worker_nice
        workers = tokenizer_threads(self.options.tokenization_workers)
        self._token_pool = worker_pool(workers, "tokenize", nice)
        # One thread per stream: the batcher keeps up to ``streams`` batches in flight.
        self._infer_pool = worker_pool(self.options.streams, "inference", nice)
        await self._start_batcher()

    async def _start_batcher(self) -> None:
        """This model's batcher over its inference threads (started before it)."""
        self._batcher = Batcher(
            self.options.name,
            self._run_batch,
            self.options.policy,
            queue=self.options.new_queue(self.backend.device),
            observers=self._observers,
            cost_of=lambda payload: payload.cost,
        )
        await self._batcher.start()

    async def close(self, *, drain: bool = True) -> None:
        if self._batcher is not None:
            await self._batcher.close(drain=drain)
        for pool in (self._token_pool, self._infer_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    @property
    def dead_since(self) -> float | None:
        """When its batcher was marked dead (``time.monotonic()``), if it was."""
        return self._batcher.fatal_at if self._batcher is not None else None

    def health(self) -> None:
        self.backend.health()
        if self._batcher is not None and self._batcher.fatal is not None:
            raise self._batcher.fatal

    def stats(self) -> dict[str, Any]:
        b = self._batcher
        return {
            "kind": self.spec.kind.value,
            "streams": self.options.streams,
            "active_requests": self._slots.total,
            "queued": b.queued if b else 0,
            "in_flight_batches": b.in_flight if b else 0,
            "batches": b.batches_run if b else 0,
            "max_batch_requests": b.max_items if b else 0,
        }

    def admit(self, tenant: Tenant = ANONYMOUS, *, note: bool = True) -> None:
        """Raise OverloadedError at once if a request of ``tenant`` could not be taken now: the
        model's ``max_concurrent_requests``, or the key's fair share of it
        (``batching/admission.py``; ``note``: see ``Slots.check``).

        Routes call it before any per-request work (see ``api.common.run_embed``), so that a
        refusal under overload costs next to nothing; ``_process`` checks again as it admits.
        """
        self._slots.check(tenant, note=note)
        if note:
            self._admitted = tenant

    def _take(self, tenant: Tenant) -> None:
        """Take a slot for a request of ``tenant`` (``Slots.take``). Its key is noted as asking
        for room (``batching/admission.py``) unless ``admit`` noted it since the last take:
        routes admit right before the model's work begins (``api.common.run_embed``), and one
        note is enough (a second only moved the instant on by the microseconds between)."""
        noted = self._admitted is tenant
        self._admitted = None
        self._slots.take(tenant, note=not noted)

    async def decode(self, sequences: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        """Token ids back to text (TEI ``/decode``), in the tokenizer threads."""
        self._check_size(len(sequences), "ids")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._token_pool,
            lambda: self.tokenizer.decode(sequences, skip_special_tokens=skip_special_tokens),
        )

    def _forward(self, batch: TokenBatch) -> list[R]:
        """Run one padded batch on the backend (in the inference thread)."""
        raise NotImplementedError

    def _run_batch(self, payloads: list[Payload]) -> asyncio.Future[list[R | BaseException]]:
        # A plain function: the batch reaches the inference thread when the batcher cuts it.
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._infer_pool, self._infer, payloads)

    def _infer(self, payloads: list[Payload]) -> list[R | BaseException]:
        """In the inference thread: tokenize deferred texts, pad, forward within the budget.

        An input that fails to tokenize (too long, bad text) gets its error in its place; the
        rest of the batch runs. Deferred costs are estimates, so a batch whose real padded size
        passes the budget runs in length-sorted pieces that each fit (``TokenBudget.pieces``).
        A pass that raises runs again in halves, so that only the inputs that fail alone fail
        (``isolation.py``).
        """
        resolved = resolve(self.tokenizer, payloads)
        out: list[R | BaseException] = [
            e if isinstance(e, EmbedplexError) else _PENDING for e in resolved
        ]
        ok = [k for k, e in enumerate(resolved) if isinstance(e, Encoded)]
        encoded = typing.cast(list[Encoded], [resolved[k] for k in ok])
        pad = self.spec.pad_token_id

        def forward(rows: list[Encoded]) -> list[R]:
            return self._forward(TokenBatch.collate(rows, pad))

        results = self.budget.run_in_pieces(
            encoded, [len(e) for e in encoded], lambda rows: isolating(forward, rows)
        )
        for k, result in zip(ok, results, strict=True):
            out[k] = result
        return out

    def _check_size(self, n: int, param: str) -> None:
        check_size(n, param, self.options.max_client_batch_size)

    async def _process(
        self,
        encode: Callable[[], list[Encoded]],
        chars: int,
        defer: Callable[[], list[Deferred]] | None = None,
        tenant: Tenant = ANONYMOUS,
        inputs: int = 1,
    ) -> Processed[R]:
        """Admit, tokenize (or defer), queue every input (``inputs`` of them, what ``encode``
        returns), and wait for all of them.

        Requests of at most ``tokenize_inline_chars`` characters are not tokenized here: with
        ``defer`` their texts are queued as they are and the inference thread tokenizes the whole
        batch in one call just before its forward pass (without ``defer``, on the event loop).
        Longer requests are tokenized in the tokenizer pool before they queue.
        """
        start = time.perf_counter()
        self._take(tenant)
        try:
            payloads = await self._payloads(encode, chars, defer, inputs, tenant)
            tokenized = time.perf_counter()
            spend = REQUEST_SPEND.get()  # a key with tpm (core/spend.py)
            if spend is None:
                items = self._submit(payloads, tenant)
            else:
                items = await self._spent(spend, payloads, tenant)
            try:
                if len(items) == 1:  # most requests: skip gather's extra future and callbacks
                    results = [await items[0].future]
                else:
                    results = list(await asyncio.gather(*(item.future for item in items)))
            finally:
                for item in items:
                    item.future.cancel()  # no-op when done; drops the rest if we failed or left
        finally:
            self._slots.release(tenant)
        self._spans(start, tokenized, items)
        return Processed(results, items, start, tokenized)

    async def _process_shared(
        self,
        keys: Sequence[Hashable],
        encode: Callable[[list[int]], list[Encoded]],
        chars: Callable[[list[int]], int],
        defer: Callable[[list[int]], list[Deferred]] | None,
        tenant: Tenant,
        on_store: Callable[[Hashable, R], None] | None = None,
    ) -> Processed[R]:
        """``_process`` where inputs identical to one queued or running (``keys`` equal) wait
        on it instead of queuing again, within one request and across requests
        (``dedupe.py``). ``encode``, ``chars`` and ``defer`` take the positions in ``keys`` of
        the inputs to queue. ``on_store``: where this caller's results go once made, if given."""
        start = time.perf_counter()
        self._take(tenant)
        flights = self._flights
        fair = self._fair
        slot_of: dict[Hashable, int] = {}
        slots: list[int] = []  # per input: its index in ``waits``
        shared: list[Flight[R] | None] = []
        waits: list[asyncio.Future[R] | None] = []
        fresh: list[int] = []  # inputs to queue (the first of each key nobody computes yet)
        own: list[Flight[R]] = []
        joined: list[tuple[Flight[R], asyncio.Future[R]]] = []
        try:
            for k, key in enumerate(keys):
                slot = slot_of.get(key)
                if slot is None:
                    slot = slot_of[key] = len(waits)
                    flight = flights.get(key)
                    if flight is not None and not flight.serves(tenant, fair):
                        flight = None  # served after our turn: a copy of our own is sooner
                    if flight is None:
                        fresh.append(k)
                        waits.append(None)
                    else:
                        waiter = flight.join(asyncio.get_running_loop())
                        joined.append((flight, waiter))
                        waits.append(waiter)
                    shared.append(flight)
                slots.append(slot)
            shared_inputs = len(keys) - len(fresh)  # joined in flight, or repeated here
            if shared_inputs:
                self._joined(shared_inputs)
            if fresh:
                payloads: list[Payload]
                if chars(fresh) <= self.options.tokenize_inline_chars:  # see ``_payloads``
                    # Lists of their own, only read: no copy (a cast would cost a call).
                    payloads = defer(fresh) if defer is not None else encode(fresh)  # type: ignore[assignment]
                else:
                    payloads = await self._tokenized(partial(encode, fresh), len(fresh), tenant)
                tokenized = time.perf_counter()
                spend = REQUEST_SPEND.get()  # a key with tpm (core/spend.py)
                if spend is None:
                    items = self._submit(payloads, tenant)
                else:
                    items = await self._spent(spend, payloads, tenant)
                requeue = self._requeue
                for k, item in zip(fresh, items, strict=True):
                    key = keys[k]
                    flight = Flight(flights, key, item, requeue, tenant, fair=fair)
                    own.append(flight)
                    slot = slot_of[key]
                    shared[slot] = flight
                    waits[slot] = item.future  # the leader waits on its item itself
            else:
                tokenized = time.perf_counter()
            ready: list[asyncio.Future[R]] = waits  # type: ignore[assignment]  # all set now
            # Most requests have one input: skip gather's extra future and callbacks.
            distinct = [await ready[0]] if len(ready) == 1 else list(await asyncio.gather(*ready))
        finally:
            self._slots.release(tenant)
            for flight in own:
                flight.release()  # joiners, if any, keep it (queued again if we cancelled it)
            for flight, waiter in joined:
                if not waiter.done() or waiter.cancelled():
                    flight.leave()  # others may still wait on it: it goes only when all have
        if on_store is not None:  # once per computation, by whichever caller resumes first
            for key, slot in slot_of.items():
                made = shared[slot]
                if made is not None and not made.stored:
                    made.stored = True
                    on_store(key, distinct[slot])
        if joined or len(shared) != len(keys):  # some shared: the items that made them
            mine = [f.item for f in shared if f is not None]
            results = [distinct[s] for s in slots]
        else:  # every input queued by this caller, in order (most requests)
            mine = list(map(_ITEM, own))
            results = distinct
        if self._tracer is not None:
            self._spans(start, tokenized, mine)
        return Processed(results, mine, start, tokenized)

    def _requeue(self, item: Item[Payload, R], tenant: Tenant) -> Item[Payload, R]:
        """Hand a dropped item to the joiners who still wait on it (``dedupe.py``): its batch
        if it is running (a pass in a thread runs on whoever leaves), else its payload queued
        again."""
        if self.batcher.rearm(item):
            return item
        return self.batcher.submit(
            [item.payload], [item.cost], trace=item.trace, tenant=tenant, admitted=True
        )[0]

    def _joined(self, n: int) -> None:
        """Count ``n`` inputs that shared the slot of an identical one: in flight for another
        request, or earlier in the same request (``embedplex_dedupe_joined``)."""

    async def _payloads(
        self,
        encode: Callable[[], list[Encoded]],
        chars: int,
        defer: Callable[[], list[Deferred]] | None,
        inputs: int,
        tenant: Tenant,
    ) -> list[Payload]:
        """The ``inputs`` payloads to queue: made here when short, else in the tokenizer pool
        (``_tokenized``)."""
        if chars <= self.options.tokenize_inline_chars:
            return list(defer()) if defer is not None else list(encode())
        return await self._tokenized(encode, inputs, tenant)

    async def _tokenized(
        self, encode: Callable[[], list[Encoded]], inputs: int, tenant: Tenant
    ) -> list[Payload]:
        """``encode`` run in the tokenizer pool once the queue has room for its ``inputs``
        (a refusal must not come after seconds of tokenizing a long body), within the
        request's deadline (``core/deadline.py``)."""
        self.batcher.room(inputs, tenant)  # submit checks again: others queue meanwhile
        work = asyncio.get_running_loop().run_in_executor(self._token_pool, encode)
        deadline = REQUEST_DEADLINE.get()
        if deadline is None:
            return list(await work)
        # Cancelled with the wait: texts no thread has started on are never tokenized.
        encoded = await within(
            work,
            deadline.remaining(),
            lambda: QueueTimeoutError(
                f"waited longer than {deadline.describe()} for a tokenizer thread",
                retry_after=1,
            ),
        )
        return list(encoded)

    def _spent(
        self, spend: Spend, payloads: list[Payload], tenant: Tenant
    ) -> Awaitable[list[Item[Payload, R]]]:
        """``_submit`` for a key with ``tpm``: its request reserves the payloads' tokens first
        (a refusal queues nothing), and is charged those that run (``core/spend.py``)."""
        cost = sum(p.bound for p in payloads)
        return spend.queue(cost, lambda: self._submit(payloads, tenant))

    def _submit(self, payloads: list[Payload], tenant: Tenant) -> list[Item[Payload, R]]:
        # With tracing on, each item keeps the request's span so its batch span links to it.
        trace = current_span_context() if self._tracer is not None else None
        return self.batcher.submit(payloads, list(map(_COST, payloads)), trace=trace, tenant=tenant)

    def _spans(self, start: float, tokenized: float, items: list[Item[Payload, R]]) -> None:
        if self._tracer is not None and items:
            request_stage_spans(self._tracer, self.options.name, start, tokenized, items)

    def _truncate(self, requested: bool | None) -> bool:
        return self.options.auto_truncate if requested is None else requested
