"""One provider at run time: its adapter, batch lanes, health, AIMD size and counters.

A lane is one ``Batcher`` per grouping key (``EmbedParams``): texts that would change the
upstream call never share one. Lanes are created on first use and closed by ``sweep`` once they
have been idle for ``idle_ttl`` seconds, so odd parameter mixes cannot grow memory without
bound. All lanes of a provider share one semaphore (bounded upstream concurrency), one circuit
breaker and one AIMD size.

Instrumented (``instrument(telemetry)``, before ``start``), a runtime reports every upstream
attempt, retry, circuit transition and AIMD size to ``telemetry.providers``, its lanes' batches
to ``telemetry.model_observers(name)``, and wraps each attempt in a span under the request whose
text opened the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx

from embedplex.batching import Batcher, BatchObserver, BatchPolicy, FifoQueue
from embedplex.core.errors import InvalidRequestError, UnavailableError, UpstreamError
from embedplex.core.types import EmbedRequest, EmbedResult, Timings, Vector
from embedplex.observability.providers import CircuitState as CircuitGauge
from embedplex.observability.providers import NullProviderObserver, ProviderObserver
from embedplex.observability.tracing import current_span_context
from embedplex.providers.aimd import AimdController
from embedplex.providers.base import Embeddings, EmbedParams, Provider
from embedplex.providers.config import ProviderConfig
from embedplex.providers.health import CircuitState, ProviderHealth
from embedplex.providers.http import Attempt

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, Tracer

    from embedplex.observability import Telemetry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Embedded:
    """One text's share of an upstream answer."""

    vector: Vector
    tokens: float


class Text(NamedTuple):
    """One queued text and its caller's request span (None unless tracing is on).

    The batch function sees payloads, not items, so the span travels with the text too.
    """

    text: str
    trace: SpanContext | None


@dataclass(slots=True)
class Lane:
    key: EmbedParams
    batcher: Batcher[Text, Embedded]
    last_used: float = field(default_factory=time.monotonic)


class ProviderRuntime:
    def __init__(
        self,
        config: ProviderConfig,
        provider: Provider,
        health: ProviderHealth,
        *,
        observers: list[BatchObserver] | None = None,
    ) -> None:
        self.config = config
        self.provider = provider
        self.name = config.name
        self.health = health
        self.aimd: AimdController | None = None  # built in start(), once limits are known
        self.lanes: dict[EmbedParams, Lane] = {}
        self.counters: Counter[str] = Counter()
        self._observers = observers or []
        self._report: ProviderObserver = NullProviderObserver()
        self._tracer: Tracer | None = None
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._closing = False
        provider.bind(self.on_attempt, self.gate, on_retry=self.on_retry)
        health.on_change = self.on_circuit

    @classmethod
    def build(
        cls,
        config: ProviderConfig,
        client: httpx.AsyncClient,
        *,
        observers: list[BatchObserver] | None = None,
    ) -> ProviderRuntime:
        """The runtime of a configured provider, on the router's pooled client (no I/O)."""
        from embedplex.providers import PROVIDER_TYPES

        health = ProviderHealth(
            failures_to_open=config.breaker_failures,
            cooldown=config.breaker_cooldown_s,
            window=config.health_window_s,
            probe_timeout=config.retry_budget_s,
        )
        provider = PROVIDER_TYPES[config.type](config, client)
        return cls(config, provider, health, observers=observers)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def ceiling(self) -> int:
        configured = self.config.max_batch_size or self.provider.limits.max_texts
        return max(1, min(configured, self.provider.limits.max_texts))

    def instrument(self, telemetry: Telemetry) -> None:
        """Report to ``telemetry``'s metrics and spans (call before ``start``)."""
        if self.aimd is not None:
            raise RuntimeError("instrument the provider before starting it")
        self._report = telemetry.providers
        self._tracer = telemetry.tracer
        self._observers = [*self._observers, *telemetry.model_observers(self.name)]
        self.provider.bind(self.on_attempt, self.gate, on_retry=self.on_retry, tracer=self._tracer)

    async def start(self) -> None:
        await self.provider.start()
        ceiling = self.ceiling
        self.aimd = AimdController(
            ceiling=ceiling,
            floor=min(self.config.min_batch_size, ceiling),
            increase=self.config.aimd_increase,
            latency_target=self.config.latency_target_ms / 1000,
        )
        self._report.on_batch_size(self.name, self.aimd.size)
        self.on_circuit(self.health.state)

    async def close(self, *, drain: bool = True) -> None:
        self._closing = True
        lanes, self.lanes = list(self.lanes.values()), {}
        await asyncio.gather(*(lane.batcher.close(drain=drain) for lane in lanes))
        await self.provider.close()

    async def sweep(self, idle_ttl: float) -> int:
        """Close lanes idle for ``idle_ttl`` seconds; return how many went."""
        now = time.monotonic()
        gone = [
            key
            for key, lane in self.lanes.items()
            if lane.batcher.idle and now - lane.last_used >= idle_ttl
        ]
        lanes = [self.lanes.pop(key) for key in gone]
        await asyncio.gather(*(lane.batcher.close() for lane in lanes))
        self.counters["lanes_evicted"] += len(lanes)
        return len(lanes)

    # -- upstream events -------------------------------------------------------------------

    def on_attempt(self, attempt: Attempt) -> None:
        """Listener for every HTTP attempt: counters, metrics, health, AIMD."""
        self.counters["upstream_calls"] += 1
        self.counters[f"outcome_{attempt.outcome.value}"] += 1
        self._report.on_upstream_call(self.name, attempt.size, attempt.latency, attempt.status_text)
        self.health.record(attempt)
        if self.aimd is not None:
            before = self.aimd.size
            size = self.aimd.observe(attempt)
            if size != before:
                for lane in self.lanes.values():
                    lane.batcher.set_max_items(size)
                self._report.on_batch_size(self.name, size)

    def on_retry(self, reason: str) -> None:
        self._report.on_retry(self.name, reason)

    def on_circuit(self, state: CircuitState) -> None:
        self._report.on_circuit_state(self.name, CircuitGauge[state.name])

    def gate(self) -> None:
        """Stop retrying once the circuit has opened (called before each retry)."""
        if not self.health.available():
            raise UnavailableError(
                f"provider {self.name}: circuit opened while retrying", param=None
            )

    # -- the batch function ----------------------------------------------------------------

    async def _call(self, batch: list[Text], params: EmbedParams) -> list[Embedded]:
        if not self.health.acquire():
            raise UnavailableError(
                f"provider {self.name}: circuit is {self.health.state.value}; "
                f"next probe in {self.health.retry_in:.1f}s"
            )
        texts = [t.text for t in batch]
        traces = [t.trace for t in batch if t.trace is not None]
        out: Embeddings | None = None
        async with self._semaphore:
            try:
                out = await self.provider.embed(texts, params, traces=traces)
            except UpstreamError as exc:
                # 413: the upstream takes fewer texts than we sent. Split and go on, so that
                # one oversized input fails alone instead of taking its batch with it.
                if exc.status != 413 or len(texts) < 2:
                    raise
        if out is None:
            self.counters["splits"] += 1
            half = len(texts) // 2
            left, right = await asyncio.gather(
                self._call(batch[:half], params), self._call(batch[half:], params)
            )
            return left + right
        self.counters["upstream_batches"] += 1
        self.counters["texts"] += len(texts)
        total = sum(len(t) for t in texts) or 1
        tokens = float(out.tokens or 0)
        # Billed tokens are per call; hand each text a share by length for usage reporting.
        return [
            Embedded(v, tokens * len(t) / total) for v, t in zip(out.vectors, texts, strict=True)
        ]

    async def _lane(self, params: EmbedParams) -> Lane:
        lane = self.lanes.get(params)
        if lane is None:
            aimd_size = self.aimd.size if self.aimd is not None else self.ceiling
            policy = BatchPolicy(
                max_items=self.ceiling,
                max_wait=self.config.max_wait_ms / 1000,
                max_concurrency=self.config.max_concurrency,
                max_queued=self.config.max_queued,
                queue_timeout=self.config.queue_timeout_ms / 1000,
            )

            async def run(batch: list[Text]) -> list[Embedded]:
                return await self._call(batch, params)

            batcher: Batcher[Text, Embedded] = Batcher(
                f"{self.name}#{self.counters['lanes_created']}",
                run,
                policy,
                queue=FifoQueue(),
                observers=self._observers,
            )
            batcher.set_max_items(aimd_size)
            lane = self.lanes[params] = Lane(params, batcher)
            await batcher.start()  # only creates the loop task: no suspension point
            self.counters["lanes_created"] += 1
        lane.last_used = time.monotonic()
        return lane

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Queue every text of ``request`` in its lane and wait for all of them."""
        if self._closing:
            raise UnavailableError(f"provider {self.name} is shutting down")
        if request.is_tokens:
            raise InvalidRequestError(
                f"provider {self.name} takes texts, not token ids", param="input"
            )
        start = time.perf_counter()
        params = EmbedParams.from_request(request, self.config.input_type)
        self.provider.check(params)
        texts: list[str] = request.inputs  # type: ignore[assignment]
        # With tracing on, each text keeps the request's span: upstream spans hang under it.
        trace = current_span_context() if self._tracer is not None else None
        lane = await self._lane(params)
        items = lane.batcher.submit(
            [Text(t, trace) for t in texts], [1] * len(texts), trace=trace, tenant=request.tenant
        )
        self.counters["requests"] += 1
        try:
            rows = await asyncio.gather(*(item.future for item in items))
        except BaseException:
            self.counters["requests_failed"] += 1
            raise
        finally:
            for item in items:
                item.future.cancel()  # no-op when done; drops the rest if we failed or left
        end = time.perf_counter()
        return EmbedResult(
            vectors=[row.vector for row in rows],
            prompt_tokens=round(sum(row.tokens for row in rows)),
            model=self.provider.model or self.name,
            provider=self.name,
            timings=Timings(
                queue=max(i.started_at - i.enqueued_at for i in items) * 1000,
                inference=max(i.finished_at - i.started_at for i in items) * 1000,
                total=(end - start) * 1000,
            ),
        )

    # -- status ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        lanes = list(self.lanes.values())
        return {
            "name": self.name,
            "type": self.provider.type,
            "model": self.provider.model,
            "endpoint": getattr(self.provider, "url", None),
            "max_texts_per_call": self.provider.limits.max_texts,
            "queued": sum(lane.batcher.queued for lane in lanes),
            "in_flight_batches": sum(lane.batcher.in_flight for lane in lanes),
            "batches": sum(lane.batcher.batches_run for lane in lanes),
            "max_batch_requests": self.aimd.size if self.aimd else self.ceiling,
            "aimd": self.aimd.snapshot() if self.aimd else None,
            "health": self.health.snapshot(),
            "counters": dict(self.counters),
            "lanes": [
                {
                    "key": lane.key.describe(),
                    "queued": lane.batcher.queued,
                    "in_flight": lane.batcher.in_flight,
                    "batches": lane.batcher.batches_run,
                    "idle_s": round(time.monotonic() - lane.last_used, 3),
                }
                for lane in lanes
            ],
        }
