"""Local models served through the batching engine: tokenizer -> batcher -> backend.

``LocalModel`` holds what every local model shares (admission, the tokenizer and inference
threads, the batcher, instrumentation, timings); ``LocalEmbeddingModel`` pools vectors and
``LocalRerankModel`` (``local_rerank.py``) scores (query, text) pairs. ``load_local_model``
builds the right one from what the model's files say it is.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from embedplex.backends.base import Backend, TokenBatch
from embedplex.backends.model_files import (
    ModelKind,
    ModelSpec,
    Pooling,
    load_spec,
    resolve_model_dir,
    tokenizer_for,
)
from embedplex.backends.onnx_cache import default_cache_dir
from embedplex.backends.passes import PassGate
from embedplex.backends.pooling import normalize_rows
from embedplex.backends.tokenizer import (
    Encoded,
    TextTokenizer,
    Token,
    TruncationDirection,
    tokenize_in_calling_thread,
)
from embedplex.backends.weights import model_hash, tokenizer_hash
from embedplex.batching import (
    DEFAULT_AGING,
    Batcher,
    BatchObserver,
    BatchPolicy,
    BatchQueue,
    Item,
    QueuePolicy,
    Slots,
    TokenBudget,
    make_queue,
)
from embedplex.cache import EmbeddingCache
from embedplex.cache.keys import MemoryKey, ids_key, model_identity, pack, redis_key, unpack
from embedplex.config import Settings
from embedplex.core.cores import tokenizer_threads
from embedplex.core.deadline import REQUEST_DEADLINE, within
from embedplex.core.errors import (
    EmbedplexError,
    EmptyInputError,
    FatalBackendError,
    QueueTimeoutError,
)
from embedplex.core.spend import REQUEST_SPEND, Spend, bounded_tokens, estimated_tokens
from embedplex.core.tenant import ANONYMOUS, Tenant
from embedplex.core.types import (
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    Timings,
    TokenEmbedResult,
    Vector,
)
from embedplex.models.checks import check_dimensions, check_size, named_prompt
from embedplex.models.config import KINDS, ModelConfig
from embedplex.models.dedupe import Flight, Flights
from embedplex.models.isolation import isolating
from embedplex.models.layout import inference_layout
from embedplex.observability.tracing import current_span_context, request_stage_spans
from embedplex.serve.process_tuning import worker_pool

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from embedplex.models.token_level import LocalTokenModel
    from embedplex.observability import Telemetry

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _set(value: T | None) -> T:
    """A key of a resolved model config: the top-level settings give it a value."""
    if value is None:
        raise ValueError("model config not resolved (use Settings.local_models)")
    return value


@dataclass(frozen=True, kw_only=True)
class LocalModelOptions:
    """The serving knobs of one local model (its resolved ``[[models]]`` table and the
    process-wide settings)."""

    name: str
    auto_truncate: bool = True  # as Settings.auto_truncate (TEI 1.9)
    default_prompt: str | None = None
    max_client_batch_size: int = 2048
    max_concurrent_requests: int = 512
    tokenization_workers: int | None = None
    tokenize_inline_chars: int = 512
    max_request_tokens: int = 262_144  # as Settings.max_request_tokens: /tokenize's answer
    streams: int = 1  # batches run at once, each from its own inference thread
    worker_nice: int = 0  # inference and tokenizer threads run this far below the event loop
    queue_policy: QueuePolicy = "fair"  # batching/fair.py; "fifo": oldest first, whoever sent
    priority_aging: float = DEFAULT_AGING  # seconds before batch work is served as interactive
    policy: BatchPolicy = field(default_factory=lambda: BatchPolicy(max_items=128, max_cost=16384))

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        spec: ModelSpec,
        *,
        run_tokens: int | None,
        model: ModelConfig | None = None,
    ) -> LocalModelOptions:
        """``run_tokens``: the backend's pass limit (``Backend.run_tokens``); the batch budget is
        decided from it and the model's settings (``TokenBudget.decide``). ``model``: the
        resolved table of the model (default: the flat settings' one model)."""
        m = model or settings.flat_model()
        prompt = m.default_prompt
        name = m.default_prompt_name or spec.default_prompt_name
        if prompt is None and name is not None:
            if name not in spec.prompts:
                raise ValueError(
                    f"default prompt name {name!r} is not among {sorted(spec.prompts)}"
                )
            prompt = spec.prompts[name]
        streams = inference_layout(settings, model=m).streams
        budget = TokenBudget.decide(
            max_batch_tokens=_set(m.max_batch_tokens),
            max_batch_requests=_set(m.max_batch_requests),
            run_tokens=run_tokens,
        )
        return cls(
            name=m.name,
            auto_truncate=_set(m.auto_truncate),
            default_prompt=prompt,
            max_client_batch_size=_set(m.max_client_batch_size),
            max_concurrent_requests=_set(m.max_concurrent_requests),
            tokenization_workers=settings.tokenization_workers,
            tokenize_inline_chars=settings.tokenize_inline_chars,
            max_request_tokens=settings.max_request_tokens,
            streams=streams,
            worker_nice=settings.inference_nice,
            queue_policy=_set(m.queue_policy),
            priority_aging=settings.priority_aging_ms / 1000,
            policy=BatchPolicy(
                max_items=budget.items,
                max_cost=budget.tokens,
                max_wait=0.0,
                max_concurrency=streams,
                max_queued=_set(m.max_queue_size),
                queue_timeout=_set(m.queue_timeout_ms) / 1000,
                run_timeout=settings.inference_timeout_s or None,  # the hung-pass watchdog
            ),
        )

    def new_queue(self, device: str) -> BatchQueue:
        """The model's queue, by ``queue_policy`` (a fresh one per batcher). On a CPU a pass
        costs its padded tokens, so a fair batch is not filled with other keys' inputs
        (``batching/fair.py``)."""
        fill = device != "cpu"
        return make_queue(self.queue_policy, lengths=True, aging=self.priority_aging, fill=fill)


def load_backend(
    settings: Settings,
    spec: ModelSpec,
    model: ModelConfig | None = None,
    *,
    gate: PassGate | None = None,
) -> Backend:
    """The configured engine; it embeds or scores according to ``spec.kind``.

    ``model``: the resolved table (default: the flat settings' model); ``gate``: the process's
    core gate, shared by every local model (``models/layout.py``).
    """
    m = model or settings.flat_model()
    layout = inference_layout(settings, model=m)
    threads = layout.threads
    if m.backend == "torch":
        from embedplex.backends.pytorch import TorchBackend

        return TorchBackend.load(
            spec, dtype=_set(m.dtype), device=_set(m.device), threads=threads, gate=gate
        )
    from embedplex.backends.onnx import OnnxBackend

    return OnnxBackend.load(
        spec,
        dtype=_set(m.dtype),
        device=_set(m.device),
        cache_dir=settings.cache_dir or default_cache_dir(),
        threads=threads,
        solo_threads=layout.solo_threads,
        int8_min_cosine=_set(m.int8_min_cosine),
        gate=gate,
    )


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
# Placeholders while a batch is being resolved (never handed to a caller).
_UNRESOLVED: Any = object()
_PENDING: Any = object()


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
        return Timings(
            tokenization=(self.tokenized - self.start) * 1000,
            queue=max(i.started_at - i.enqueued_at for i in items) * 1000,
            inference=max(i.finished_at - i.started_at for i in items) * 1000,
            total=(end - self.start) * 1000,
        )


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
        resolved = self._resolve(payloads)
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

    def _resolve(self, payloads: list[Payload]) -> list[Encoded | EmbedplexError]:
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
            done = self.tokenizer.encode_each(
                [d.text for d in texts],
                [d.index for d in texts],
                truncate=truncate,
                direction=direction,
            )
            for k, d, e in zip(ks, texts, done, strict=True):
                out[k] = e
                d.cost = e.cost if isinstance(e, Encoded) else 0
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
        self._slots.take(tenant)
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
        self._slots.take(tenant)
        flights = self._flights
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
                    if flight is not None and not flight.serves(tenant, self._fair):
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
                payloads = await self._payloads(
                    lambda: encode(fresh),
                    chars(fresh),
                    None if defer is None else lambda: defer(fresh),
                    len(fresh),
                    tenant,
                )
                tokenized = time.perf_counter()
                spend = REQUEST_SPEND.get()  # a key with tpm (core/spend.py)
                if spend is None:
                    items = self._submit(payloads, tenant)
                else:
                    items = await self._spent(spend, payloads, tenant)
                requeue = self._requeue
                for k, item in zip(fresh, items, strict=True):
                    flight = Flight(flights, keys[k], item, requeue, tenant, fair=self._fair)
                    own.append(flight)
                    slot = slot_of[keys[k]]
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
        mine = [f.item for f in shared if f is not None]
        self._spans(start, tokenized, mine)
        return Processed([distinct[s] for s in slots], mine, start, tokenized)

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
        once the queue has room for them (a refusal must not come after seconds of tokenizing
        a long body), within the request's deadline (``core/deadline.py``)."""
        if chars <= self.options.tokenize_inline_chars:
            return list(defer()) if defer is not None else list(encode())
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
        costs = [p.cost for p in payloads]
        return self.batcher.submit(payloads, costs, trace=trace, tenant=tenant)

    def _spans(self, start: float, tokenized: float, items: list[Item[Payload, R]]) -> None:
        if self._tracer is not None and items:
            request_stage_spans(self._tracer, self.options.name, start, tokenized, items)

    def _deferred(
        self,
        texts: list[str],
        truncate: bool,
        direction: TruncationDirection,
        picked: list[int] | None = None,
    ) -> list[Deferred]:
        """``picked``: only these positions of ``texts`` (their positions name them in errors)."""
        # The cost is a guess until the thread tokenizes (about 4 characters a token); it only
        # groups similar lengths and sizes the batch, and _infer splits a batch it underrated.
        # A key's tpm reserves the bound instead (one token a character: non-English text
        # counts up to 4 times the guess), settled to the real count at the finish.
        cap = self.spec.max_input_length
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

    def _truncate(self, requested: bool | None) -> bool:
        return self.options.auto_truncate if requested is None else requested


@dataclass(frozen=True, slots=True)
class Pooled:
    """One input's pooled vector, the same scaled to unit length, and its token count (all made
    per batch in the inference thread, so the event loop only picks)."""

    raw: Vector
    unit: Vector
    tokens: int


# What one cache entry costs besides its key's text and its two vectors: the key tuple, the
# Pooled, two array headers, the LRU's slot (measured with tracemalloc: docs/cache.md).
_ENTRY_OVERHEAD = 512


def _owned(raw: Vector, unit: Vector, tokens: int) -> Pooled:
    raw = raw.copy()
    unit = unit.copy()
    raw.flags.writeable = False
    unit.flags.writeable = False
    return Pooled(raw, unit, tokens)


def _revision(spec: ModelSpec) -> str:
    """What names the weights and the tokenizer: the hub's commit, else (a local directory, the
    bundled model) the SHA-256 of the config and weight files, which the ONNX backend has
    computed already for its export's key (``model_hash`` keeps it), and of ``tokenizer.json``:
    new weights, or a new tokenizer, put at the same path must not be answered from the old
    files' entries in Redis (entries are keyed by text)."""
    if spec.sha is not None:
        return spec.sha
    return f"files:{model_hash(spec.path)}:{tokenizer_hash(spec.path)}"


def _size(key: MemoryKey, pooled: Pooled) -> int:
    """The bytes one entry holds: its text (or ids), both vectors, and the rest."""
    return sys.getsizeof(key[0]) + pooled.raw.nbytes + pooled.unit.nbytes + _ENTRY_OVERHEAD


class LocalEmbeddingModel(LocalModel[Pooled]):
    """Pools vectors; identical inputs in flight share one slot, and results are cached
    (``cache``: the process's ``EmbeddingCache``, shared by every local model)."""

    _tokens: LocalTokenModel | None = None  # made on the first embed_all (token_level.py)

    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: TextTokenizer,
        backend: Backend,
        options: LocalModelOptions,
        *,
        observers: list[BatchObserver] | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        super().__init__(spec, tokenizer, backend, options, observers=observers)
        self.cache = cache if cache is not None else EmbeddingCache()
        self._counts = self.cache.counts_of(options.name)
        self._tag = EmbeddingCache.new_tag()
        # Names this instance across replicas: what the same name may be served from. Only
        # Redis keys need it, so only a cache with Redis pays for ``_revision``.
        self._identity = b""
        if self.cache.redis is not None:
            self._identity = model_identity(
                spec.model_id,
                _revision(spec),
                spec.pooling.value,
                backend.name,
                backend.dtype,
                spec.max_input_length,
                # Entries written before do_lower_case was honoured hold unlowered vectors.
                *(("lowercase",) if tokenizer.lowered else ()),
            )

    def _joined(self, n: int) -> None:
        self._counts.dedupe_joined += n

    @classmethod
    def load(
        cls, settings: Settings, *, observers: list[BatchObserver] | None = None
    ) -> LocalEmbeddingModel:
        """Resolve, read and load the configured embedding model (blocking; use a thread)."""
        model = load_local_model(settings, observers=observers)
        if not isinstance(model, LocalEmbeddingModel):
            raise FatalBackendError(f"{settings.model_id} is not an embedding model")
        return model

    def _forward(self, batch: TokenBatch) -> list[Pooled]:
        raw = self.backend.embed(batch)
        lengths = batch.attention_mask.sum(axis=1).tolist()
        units = normalize_rows(raw)
        if self.cache.memory is None:
            return [Pooled(r, u, n) for r, u, n in zip(raw, units, lengths, strict=True)]
        # Cached rows own their memory (a row of the batch's matrix would keep all of it
        # alive) and are read-only: every caller that gets them shares them.
        return [_owned(r, u, n) for r, u, n in zip(raw, units, lengths, strict=True)]

    def _lookup(self, keys: list[MemoryKey]) -> tuple[list[Pooled | None], list[int]]:
        """Each input's result in this process's cache (or None), and the positions missed."""
        memory = self.cache.memory
        assert memory is not None
        get = memory.get
        found: list[Pooled | None] = [get(key) for key in keys]
        missed = [k for k, p in enumerate(found) if p is None]
        self._counts.hits_memory += len(keys) - len(missed)
        return found, missed

    async def _lookup_shared(
        self, keys: list[MemoryKey], found: list[Pooled | None], missed: list[int]
    ) -> list[int]:
        """Fill ``found`` from the Redis tier (one round trip) for what missed here and nobody
        here computes now; the positions still missed."""
        redis = self.cache.redis
        memory = self.cache.memory
        assert redis is not None
        assert memory is not None
        asked = [k for k in missed if keys[k] not in self._flights]
        values = await redis.get_many([redis_key(self._identity, keys[k]) for k in asked])
        dim = self.backend.dim
        cap = self.spec.max_input_length
        counts = self._counts
        for k, value in zip(asked, values, strict=True):
            if value is None:
                continue
            got = unpack(value, dim, cap)
            if got is None:
                counts.redis_refused += 1
                continue
            raw, tokens = got
            pooled = _owned(raw, normalize_rows(raw), tokens)
            found[k] = pooled
            memory.put(keys[k], pooled, _size(keys[k], pooled))
            counts.hits_redis += 1
        return [k for k in missed if found[k] is None]

    def _remember(self, key: Hashable, pooled: Pooled) -> None:
        """A result just made: into this process's cache, and Redis's in the background."""
        memory = self.cache.memory
        if memory is None:
            return
        mkey: MemoryKey = key  # type: ignore[assignment]  # no cast call per result
        memory.put(mkey, pooled, _size(mkey, pooled))
        redis = self.cache.redis
        if redis is not None:
            redis.put(redis_key(self._identity, mkey), pack(pooled.raw, pooled.tokens))

    async def _checked_ids(
        self, ids: list[list[int]], truncate: bool, direction: TruncationDirection
    ) -> list[Encoded]:
        """Token ids checked against the vocabulary and the input cap, and truncated: the same
        refusals with the cache on or off, and keys that hold only what is embedded. Long
        lists are checked in the tokenizer pool (up to ``max_request_tokens`` ids are not
        free to scan on the event loop)."""

        def check() -> list[Encoded]:
            return self.tokenizer.encode_ids(ids, truncate=truncate, direction=direction)

        if sum(len(seq) for seq in ids) <= self.options.tokenize_inline_chars:
            return check()
        return await asyncio.get_running_loop().run_in_executor(self._token_pool, check)

    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            return named_prompt(prompt_name, self.spec.prompts)
        return self.options.default_prompt

    def _texts(self, request: EmbedRequest) -> list[str]:
        texts = typing.cast(list[str], request.inputs)
        prompt = self._prompt(request.prompt, request.prompt_name)
        return [prompt + text for text in texts] if prompt else texts

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._check_size(len(request.inputs), "input")
        dims = request.dimensions
        check_dimensions(dims, self.backend.dim)
        start = time.perf_counter()
        truncate = self._truncate(request.truncate)
        direction = request.truncation_direction
        left = direction == TruncationDirection.LEFT  # the enum, or its value as a str
        tag = self._tag
        texts: list[str] = []
        checked: list[Encoded] = []  # token ids: checked and truncated, before any key
        keys: list[MemoryKey]
        if request.is_tokens:
            ids = typing.cast(list[list[int]], request.inputs)
            checked = await self._checked_ids(ids, truncate, direction)
            # The key is the ids embedded (truncation applied, so its flags add nothing).
            keys = [(ids_key(e.ids), False, False, tag) for e in checked]
        else:
            texts = self._texts(request)
            keys = [(text, truncate, left, tag) for text in texts]
        use_cache = request.cache and self.cache.memory is not None
        cached: list[Pooled | None] | None = None
        rest: list[int] | None = None  # the inputs to compute (None: all of them)
        if use_cache:
            cached, rest = self._lookup(keys)
            redis = self.cache.redis
            if rest and redis is not None and redis.up:
                rest = await self._lookup_shared(keys, cached, rest)
            self._counts.misses += len(rest)

        def chosen(picked: list[int]) -> list[int]:  # positions in ``rest`` -> in the request
            return picked if rest is None else [rest[j] for j in picked]

        def encode(picked: list[int]) -> list[Encoded]:
            ks = chosen(picked)
            if request.is_tokens:
                return [checked[k] for k in ks]
            try:
                return self.tokenizer.encode(
                    [texts[k] for k in ks], truncate=truncate, direction=direction
                )
            except EmbedplexError:
                if len(ks) < len(keys):  # name the input by its place in the whole request
                    self.tokenizer.encode(texts, truncate=truncate, direction=direction)
                raise

        results: list[Pooled]
        timings: Timings
        if rest is not None and not rest:  # every input was cached: the queue never sees it
            results = typing.cast(list[Pooled], cached)
            took = (time.perf_counter() - start) * 1000
            timings = Timings(total=took)
        else:
            if request.is_tokens:  # checked already: picking them is all that is left
                chars: Callable[[list[int]], int] = lambda picked: 0  # noqa: E731
                defer = None
            else:
                chars = lambda picked: sum(len(texts[k]) for k in chosen(picked))  # noqa: E731
                defer = lambda picked: self._deferred(  # noqa: E731
                    texts, truncate, direction, chosen(picked)
                )
            done = await self._process_shared(
                keys if rest is None else [keys[k] for k in rest],
                encode,
                chars,
                defer,
                request.tenant,
                self._remember if use_cache else None,
            )
            if rest is None:
                results = done.results
            else:  # merge: cached inputs where they were, computed ones in order between
                merged = typing.cast(list[Pooled], cached)
                for k, pooled in zip(rest, done.results, strict=True):
                    merged[k] = pooled
                results = merged
            timings = done.timings()
        if dims is None:
            vectors = [p.unit if request.normalize else p.raw for p in results]
        else:  # Matryoshka: cut first, then normalize what is left
            matrix = np.stack([p.raw[:dims] for p in results])
            vectors = list(normalize_rows(matrix) if request.normalize else matrix)
        return EmbedResult(
            vectors=vectors,
            prompt_tokens=sum(p.tokens for p in results),  # hits too: the same answer
            model=self.options.name,
            timings=timings,
        )

    async def embed_all(self, request: EmbedRequest) -> TokenEmbedResult:
        """Every token's vector, unpooled (TEI ``/embed_all``), through a token-level twin."""
        if self._tokens is None:
            from embedplex.models.token_level import LocalTokenModel

            tokens = LocalTokenModel(self)
            await tokens.start()  # never suspends: two first callers cannot both make one
            self._tokens = tokens
        return await self._tokens.embed_all(request)

    async def close(self, *, drain: bool = True) -> None:
        if self._tokens is not None:
            await self._tokens.close(drain=drain)
        await super().close(drain=drain)

    async def tokenize(
        self, texts: list[str], *, add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        if not texts:
            raise EmptyInputError("inputs cannot be empty", param="inputs")
        prompt = self._prompt(None, prompt_name)
        if prompt:
            texts = [prompt + t for t in texts]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._token_pool,
            lambda: self.tokenizer.tokens(
                texts,
                add_special_tokens=add_special_tokens,
                max_tokens=self.options.max_request_tokens,
            ),
        )


def read_model(settings: Settings, m: ModelConfig) -> ModelSpec:
    """What a configured model's files say, with its table's overrides (blocking I/O: the
    hub)."""
    path, sha = resolve_model_dir(m.model_id, revision=m.revision, old_cache_dir=settings.cache_dir)
    return load_spec(
        m.model_id,
        path,
        revision=m.revision,
        sha=sha,
        pooling=Pooling(m.pooling) if m.pooling else None,
        max_input_length=m.max_input_length,
    )


def load_local_model(
    settings: Settings,
    model: ModelConfig | None = None,
    *,
    observers: list[BatchObserver] | None = None,
    gate: PassGate | None = None,
    cache: EmbeddingCache | None = None,
) -> LocalModel[Any]:
    """Resolve, read and load a configured model (blocking I/O; call from a thread).

    ``model``: a resolved table of ``Settings.local_models()`` (default: the flat settings'
    one model); ``gate``: the process's core gate (``models/layout.py``); ``cache``: the
    process's embedding cache (default: none, in-flight dedupe only).
    """
    m = model or settings.flat_model()
    spec = read_model(settings, m)
    expected = m.model_kind
    if expected is not None and spec.kind is not expected:
        found = next(k for k, v in KINDS.items() if v is spec.kind)
        raise FatalBackendError(
            f"model {m.name!r} is configured as kind = {m.kind!r}, but {m.model_id} is a "
            f"{found} model"
        )
    tokenizer = tokenizer_for(spec)
    backend = load_backend(settings, spec, m, gate=gate)
    logger.info(
        "%s: inference layout %s (batches at once x intra-op threads)",
        m.name,
        inference_layout(settings, model=m),
    )
    options = LocalModelOptions.from_settings(
        settings, spec, run_tokens=backend.run_tokens, model=m
    )
    if spec.kind is ModelKind.RERANKER:
        from embedplex.models.rerank import LocalRerankModel

        return LocalRerankModel(spec, tokenizer, backend, options, observers=observers)
    return LocalEmbeddingModel(spec, tokenizer, backend, options, observers=observers, cache=cache)
