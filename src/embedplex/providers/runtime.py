"""One provider at run time: its adapter, batch lanes, health, AIMD size and counters.

A lane is one ``Batcher`` per grouping key (``EmbedParams``): texts that would change the
upstream call never share one. Lanes are created on first use and closed by ``sweep`` once they
have been idle for ``idle_ttl`` seconds, so odd parameter mixes cannot grow memory without
bound. All lanes of a provider share one semaphore (bounded upstream concurrency), one circuit
breaker and one AIMD size.

Rerank calls have lanes of their own (``rerank_lanes``: one query per upstream call, see that
module). Both kinds are a ``lanes.LaneSet`` and reach the upstream through one
``guard.UpstreamGuard`` (breaker, semaphore, split on 413), so they are created, swept and
guarded the same way.

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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import httpx

from embedplex.batching import BatchObserver
from embedplex.cache.keys import RemoteKey
from embedplex.core.deadline import REQUEST_DEADLINE, bound_batch
from embedplex.core.errors import (
    ClientError,
    InvalidRequestError,
    KeyRateLimitedError,
    UnavailableError,
)
from embedplex.core.redact import redact_endpoint, redact_query
from embedplex.core.spend import REQUEST_SPEND, estimated_tokens
from embedplex.core.tenant import Tenant
from embedplex.core.types import EmbedRequest, EmbedResult, RerankRequest, RerankResult, Timings
from embedplex.models.dedupe import Flight, Flights, Sharing
from embedplex.observability.providers import CircuitState as CircuitGauge
from embedplex.observability.providers import NullProviderObserver, ProviderObserver
from embedplex.observability.tracing import current_span_context
from embedplex.providers.aimd import AimdController
from embedplex.providers.base import EmbedParams, Provider, Reranker, budget_tokens
from embedplex.providers.cached import Embedded, Entry, ProviderCache, Scope, served
from embedplex.providers.config import ProviderConfig
from embedplex.providers.guard import UpstreamGuard, token_shares
from embedplex.providers.health import CircuitState, ProviderHealth
from embedplex.providers.http import CALL_FAILOVER, FAILOVER, Attempt
from embedplex.providers.lanes import Lane, LaneSet, timings
from embedplex.providers.rerank_lanes import RerankLanes

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, Tracer

    from embedplex.batching import Item
    from embedplex.cache import EmbeddingCache
    from embedplex.observability import Telemetry

logger = logging.getLogger(__name__)

# What the router's health probe sends (``ProviderRuntime.probe``).
PROBE_TEXT = "embedplex health probe"
# Parameter sets ``ProviderRuntime._params`` keeps; past this the table starts again.
_CHECKED_MAX = 256
_ONE = [1]  # the costs of one queued text without a token cap (the batcher only reads them)


class Text(NamedTuple):
    """One queued text, its caller's request span (None unless tracing is on), its caller's
    deadline (a ``time.monotonic()`` instant; None: none set), where its result is kept
    (``keep``: its scope in the embedding cache; None: not kept) and whether its caller has
    another provider to go to (``failover``: ``http.FAILOVER``).

    The batch function sees payloads, not items, so span, deadline, scope and failover travel
    with the text. A caller that joins the text while it is still queued may widen the
    deadline, set ``keep`` and clear ``failover`` (``_joinable``).
    """

    text: str
    trace: SpanContext | None
    deadline: float | None = None
    keep: Scope | None = None
    failover: bool = False

    @property
    def cost(self) -> int:
        """Its tokens as reserved, and as charged when its request ends without an answer
        (``core/spend.py``) or its upstream's answer gives no count (``_call``)."""
        return estimated_tokens(len(self.text))

    @property
    def bound(self) -> int:
        """What a key's tpm reserves for it: the estimate (an upstream's tokenizer, and so
        any bound, is unknown here; ``docs/limits.md``)."""
        return self.cost


EmbedLane = Lane[EmbedParams, Text, Embedded]


class ProviderRuntime:
    def __init__(
        self,
        config: ProviderConfig,
        provider: Provider,
        health: ProviderHealth,
        *,
        observers: list[BatchObserver] | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.config = config
        self.provider = provider
        # The process's embedding cache as this provider uses it (nothing kept with no cache or
        # with the provider's ``cache = false``); texts queued or in flight, by cache key.
        self.cache = ProviderCache(cache, config, provider)
        self._flights: Flights = {}
        self.name = config.name
        self.health = health
        self.aimd: AimdController | None = None  # built in start(), once limits are known
        self.counters: Counter[str] = Counter()
        self._report: ProviderObserver = NullProviderObserver()
        self._tracer: Tracer | None = None
        self._guard = UpstreamGuard(
            self.name,
            health,
            asyncio.Semaphore(config.max_concurrency),
            self.counters,
            budget=config.retry_budget_s,
        )
        self._embeds: LaneSet[EmbedParams, Text, Embedded] = LaneSet(
            config, self._call, self.counters, renew=_unbound
        )
        self._closing = False
        self._checked: dict[tuple[Any, ...], Scope] = {}  # see _params
        # The adapter's limits and served model as the lanes and scopes last took them
        # (``_sync``); with a token cap, each queued text costs its ``budget_tokens``.
        self._limits = provider.limits
        self._served = served(provider)
        self._costed = self._limits.max_tokens is not None
        # What this provider last served: the router's probe asks the same kind of question.
        self.last_kind: Literal["embed", "rerank"] = "embed"
        self.rerank_lanes: RerankLanes | None = None
        if isinstance(provider, Reranker):
            self.rerank_lanes = RerankLanes(config, provider, self._guard, after=self._sync)
        self._observe(observers or [])
        provider.bind(self.on_attempt, self.gate, on_retry=self.on_retry)
        health.on_change = self.on_circuit

    @classmethod
    def build(
        cls,
        config: ProviderConfig,
        client: httpx.AsyncClient,
        *,
        observers: list[BatchObserver] | None = None,
        cache: EmbeddingCache | None = None,
    ) -> ProviderRuntime:
        """The runtime of a configured provider, on the router's pooled client (no I/O);
        ``cache``: the process's embedding cache (None: nothing kept, dedupe only)."""
        from embedplex.providers import PROVIDER_TYPES

        health = ProviderHealth(
            failures_to_open=config.breaker_failures,
            cooldown=config.breaker_cooldown_s,
            window=config.health_window_s,
            probe_timeout=config.retry_budget_s,
        )
        provider = PROVIDER_TYPES[config.type](config, client)
        return cls(config, provider, health, observers=observers, cache=cache)

    @property
    def lanes(self) -> dict[EmbedParams, EmbedLane]:
        """The embedding lanes by key (rerank lanes: ``rerank_lanes``)."""
        return self._embeds.lanes

    def _observe(self, observers: list[BatchObserver]) -> None:
        """Report the batches of every lane, embed and rerank, made from now on to these."""
        self._observers = observers
        self._embeds.observers = observers
        if self.rerank_lanes is not None:
            self.rerank_lanes.observers = observers

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
        self._observe([*self._observers, *telemetry.model_observers(self.name)])
        self.provider.bind(self.on_attempt, self.gate, on_retry=self.on_retry, tracer=self._tracer)

    async def start(self) -> None:
        await self.provider.start()
        self._limits = self.provider.limits
        self._served = served(self.provider)
        self._costed = self._limits.max_tokens is not None
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
        await self._embeds.close(drain=drain)
        if self.rerank_lanes is not None:
            await self.rerank_lanes.close(drain=drain)
        await self.provider.close()

    async def probe(self) -> None:
        """The router's health probe: one small upstream call of the kind this provider last
        served (a reranker may not embed), made outside the lanes. Its attempt reaches the
        breaker, AIMD and the upstream metrics as any other; it is no client's input, so the
        batch metrics (``embedplex_inputs_total``, ``embedplex_batch_size``) and the recent
        throughput do not count it. Never from the cache: it is there to reach the upstream."""
        if self._closing:
            raise UnavailableError(f"provider {self.name} is shutting down")
        if self.last_kind == "rerank" and self.rerank_lanes is not None:
            await self.rerank_lanes.probe(PROBE_TEXT)
            return
        scope = self._params(EmbedRequest(inputs=[PROBE_TEXT], cache=False))
        await self._call([Text(PROBE_TEXT, None)], scope.params)

    async def sweep(self, idle_ttl: float) -> int:
        """Close lanes idle for ``idle_ttl`` seconds; return how many went."""
        evicted = await self._embeds.sweep(idle_ttl)
        if self.rerank_lanes is not None:
            evicted += await self.rerank_lanes.sweep(idle_ttl)
        self.counters["lanes_evicted"] += evicted
        return evicted

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
                self._embeds.set_max_items(size)
                self._report.on_batch_size(self.name, size)

    def on_retry(self, reason: str) -> None:
        self._report.on_retry(self.name, reason)

    def on_circuit(self, state: CircuitState) -> None:
        self._report.on_circuit_state(self.name, CircuitGauge[state.name])

    def _sync(self) -> None:
        """Take up what the adapter learned during a call: new limits (TEI's /info read late,
        a refusal that named the upstream's limit: docs/router.md) resize every lane and the
        AIMD ceiling; a new served model (TEI's /info) makes new cache scopes, so texts are
        kept under what the upstream now says it serves (``Scope.served``). One identity test
        per call when nothing changed."""
        limits = self.provider.limits
        if limits is not self._limits:
            self._limits = limits
            self._costed = limits.max_tokens is not None
            ceiling = self.ceiling
            size = ceiling
            if self.aimd is not None:
                self.aimd.set_ceiling(ceiling, self.config.min_batch_size)
                size = self.aimd.size
                self._report.on_batch_size(self.name, size)
            self._embeds.set_limits(ceiling, limits.max_tokens, size)
            if self.rerank_lanes is not None:
                self.rerank_lanes.set_limits()
        now = served(self.provider)
        if now != self._served:
            self._served = now
            self._checked.clear()

    def gate(self) -> None:
        """Stop retrying once the circuit has opened (called before each retry)."""
        if not self.health.available():
            raise UnavailableError(
                f"provider {self.name}: circuit opened while retrying", param=None
            )

    # -- the batch function ----------------------------------------------------------------

    async def _call(self, batch: list[Text], params: EmbedParams) -> list[Embedded | BaseException]:
        """The lanes' batch function: one upstream call, or more after a 413, 400 or 422
        (``guard``: a text the upstream refuses fails alone).

        What the upstream answered for a text whose callers cache it is kept here, once per
        call, whoever is still waiting: an answer paid for is not paid for again."""

        # The upstream call need not outlast its most patient caller (``core/deadline.py``),
        # nor wait out a 429 when every caller can go elsewhere (``http.CALL_FAILOVER``).
        bound_batch([t.deadline for t in batch])
        CALL_FAILOVER.set(all(t.failover for t in batch))

        async def send(part: list[Text]) -> list[Embedded]:
            texts = [t.text for t in part]
            traces = [t.trace for t in part if t.trace is not None]
            try:
                out = await self.provider.embed(texts, params, traces=traces)
            finally:
                self._sync()
            self.counters["upstream_batches"] += 1
            self.counters["texts"] += len(texts)
            if out.tokens is None:
                # No count in the answer (an OpenAI-compatible server without usage, a TEI
                # whose headers a proxy dropped): each text costs its estimate, what its
                # request reserved, so the key's tpm holds (docs/limits.md).
                shares = [float(t.cost) for t in part]
            else:
                shares = token_shares(out.tokens, texts)
            rows = [Embedded(v, t) for v, t in zip(out.vectors, shares, strict=True)]
            store = self.cache.store
            now = self._served
            for t, row in zip(part, rows, strict=True):
                if t.keep is not None and t.keep.served == now:
                    store(t.text, t.keep, row.vector, row.tokens)
            return rows

        return await self._guard.call(batch, send, _cost)

    async def _new_lane(self, params: EmbedParams) -> EmbedLane:
        """The lane of ``params`` when it has none yet (every later request: ``existing``)."""
        aimd_size = self.aimd.size if self.aimd is not None else self.ceiling
        return await self._embeds.lane(
            params, ceiling=self.ceiling, size=aimd_size, max_cost=self._limits.max_tokens
        )

    def _params(self, request: EmbedRequest) -> Scope:
        """The request's ``EmbedParams``, checked against the provider, in their cache scope.

        Every routed request needs them, and nearly all share a handful of parameter sets, so a
        set that passed ``check`` is kept by its fields (``Provider.check`` depends on nothing
        else) with its scope; the table is bounded, as callers choose the values. What the
        upstream serves may have changed since the last call (TEI's /info, read in the
        background): the scopes follow it from this request on (``_sync``).
        """
        if served(self.provider) != self._served:
            self._sync()
        extra = request.extra.get("input_type") if request.extra else None
        if extra is not None and not isinstance(extra, str):  # not a key: check it every time
            params = EmbedParams.from_request(request, self.config.input_type)
            self.provider.check(params)
            return self.cache.scope(params)
        key = (
            request.normalize,
            request.truncate,
            request.truncation_direction,
            request.dimensions,
            request.prompt_name,
            extra,
        )
        cached = self._checked.get(key)
        if cached is not None:
            return cached
        params = EmbedParams.from_request(request, self.config.input_type)
        self.provider.check(params)
        if len(self._checked) >= _CHECKED_MAX:
            self._checked.clear()
        scope = self._checked[key] = self.cache.scope(params)
        return scope

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Answer from the cache what it holds; queue the rest in its lane and wait for it.

        A text identical to one queued or in flight here (same scope) waits on that one
        instead of queuing again (``models/dedupe.py``); a request the cache answers whole
        never reaches a lane. One-text requests (most) take ``_one``: the same steps without
        the lists that several texts need.
        """
        if self._closing:
            raise UnavailableError(f"provider {self.name} is shutting down")
        if request.is_tokens:
            raise InvalidRequestError(
                f"provider {self.name} takes texts, not token ids", param="input"
            )
        self.last_kind = "embed"
        start = time.perf_counter()
        scope = self._params(request)
        texts: list[str] = request.inputs  # type: ignore[assignment]
        cache = self.cache
        memory = cache.memory
        keep = scope if request.cache and memory is not None else None
        if len(texts) == 1:
            key = (texts[0], scope.tag)
            if keep is not None:
                hit = memory.get(key)  # type: ignore[union-attr]  # set where keep is
                if hit is not None:  # no lane, no upstream call
                    cache.counts.hits_memory += 1
                    return self._result([hit], Timings(total=(time.perf_counter() - start) * 1000))
                redis = cache.redis
                if redis is not None and redis.up and key not in self._flights:
                    return await self.embed_many(request, scope, keep, start)
                cache.counts.misses += 1
            row, item = await self._one(key, scope, keep, request.tenant)
            return self._result([row], timings((item,), start))
        return await self.embed_many(request, scope, keep, start)

    async def embed_many(
        self, request: EmbedRequest, scope: Scope, keep: Scope | None, start: float
    ) -> EmbedResult:
        """``embed`` of several texts, or of one that Redis may hold."""
        texts: list[str] = request.inputs  # type: ignore[assignment]
        cache = self.cache
        found: list[Entry | None] | None = None
        rest: list[int] | None = None  # the positions to compute (None: all of them)
        if keep is not None:
            found, rest = cache.lookup(texts, scope.tag)
            redis = cache.redis
            if rest and redis is not None and redis.up:
                missed = len(rest)
                rest = await cache.lookup_shared(texts, scope, found, rest, self._flights)
                cache.counts.hits_redis += missed - len(rest)
            cache.counts.misses += len(rest)
            if not rest:  # every text was cached: no lane, no upstream call
                took = Timings(total=(time.perf_counter() - start) * 1000)
                return self._result(found, took)  # type: ignore[arg-type]  # all found
        todo = texts if rest is None else [texts[k] for k in rest]
        rows, items = await self._shared(todo, scope, keep, request.tenant)
        if found is not None and rest is not None:  # cached texts where they were, the rest between
            for k, row in zip(rest, rows, strict=True):
                found[k] = row
            rows = found  # type: ignore[assignment]  # every position filled now
        return self._result(rows, timings(items, start))

    async def cached_only(self, request: EmbedRequest) -> EmbedResult | None:
        """The answer to ``request`` from this provider's cache alone (the process's tier,
        then Redis), or None unless it holds every text.

        The router asks it of a provider whose circuit lets no call through, so that cached
        texts outlive an upstream outage. Never part of an answer: one provider answers the
        whole request or none of it. None, too, for a request that opts out of the cache or
        that this provider would refuse (the router goes on as without a cache).
        """
        cache = self.cache
        if not request.cache or cache.memory is None or request.is_tokens or self._closing:
            return None
        start = time.perf_counter()
        try:
            scope = self._params(request)
        except ClientError:
            return None
        texts: list[str] = request.inputs  # type: ignore[assignment]  # not tokens: checked
        rows = await cache.lookup_whole(texts, scope)
        if rows is None:
            return None
        return self._result(rows, Timings(total=(time.perf_counter() - start) * 1000))

    def _result(self, rows: Sequence[Entry], took: Timings) -> EmbedResult:
        """``rows``: answers (``Embedded``) and cache entries alike, read as (vector, tokens)."""
        if len(rows) == 1:
            vectors, tokens = [rows[0][0]], rows[0][1]
        else:
            vectors, tokens = [row[0] for row in rows], sum(row[1] for row in rows)
        return EmbedResult(
            vectors=vectors,
            prompt_tokens=round(tokens),  # hits too: what computing them reported
            model=self.provider.model or self.name,
            provider=self.name,
            timings=took,
        )

    async def _one(
        self, key: RemoteKey, scope: Scope, keep: Scope | None, tenant: Tenant
    ) -> tuple[Embedded, Item[Text, Embedded]]:
        """``_shared`` of one text, written out: the routed path's common case."""
        trace = current_span_context() if self._tracer is not None else None
        deadline = REQUEST_DEADLINE.get()
        at = deadline.at if deadline is not None else None
        failover = FAILOVER.get()
        self.counters["requests"] += 1
        flights = self._flights
        flight: Flight[Embedded] | None = flights.get(key)
        try:
            if flight is not None and _joinable(flight, at, keep, failover):
                self.cache.counts.dedupe_joined += 1
                waiter = flight.join(asyncio.get_running_loop())
                try:
                    return await waiter, flight.item
                finally:
                    if not waiter.done() or waiter.cancelled():
                        flight.leave()
            lane = self._embeds.existing(scope.params) or await self._new_lane(scope.params)
            texts = [Text(key[0], trace, at, keep, failover)]
            costs = [budget_tokens(key[0])] if self._costed else _ONE
            spend = REQUEST_SPEND.get()  # a key with tpm reserves first (core/spend.py)
            if spend is None:
                queued = lane.batcher.submit(texts, costs, trace=trace, tenant=tenant)
            else:
                queued = await spend.queue(
                    texts[0].bound,
                    lambda: lane.batcher.submit(texts, costs, trace=trace, tenant=tenant),
                )
            item = queued[0]
            flight = Flight(flights, key, item, lane.requeue, tenant)
            try:
                return await item.future, item
            finally:
                flight.release()
        except KeyRateLimitedError:
            raise  # the caller's key, not this provider, refused it
        except BaseException:
            self.counters["requests_failed"] += 1
            raise

    async def _shared(
        self, texts: list[str], scope: Scope, keep: Scope | None, tenant: Tenant
    ) -> tuple[list[Embedded], list[Item[Text, Embedded]]]:
        """Queue the texts nobody here computes now, join those somebody does, wait for all.

        Counted as a request of the provider (``requests``, ``requests_failed``). Whatever way
        this ends, our texts that nobody else waits on are dropped (a failed or departed
        caller's texts must not cost an upstream call); those others wait on stay theirs.
        """
        # With tracing on, each text keeps the request's span: upstream spans hang under it.
        trace = current_span_context() if self._tracer is not None else None
        deadline = REQUEST_DEADLINE.get()
        at = deadline.at if deadline is not None else None
        failover = FAILOVER.get()
        tag = scope.tag
        flights = self._flights
        keys = [(text, tag) for text in texts]
        joinable = None if not flights else lambda f: _joinable(f, at, keep, failover)
        sharing: Sharing[Embedded] = Sharing(flights, keys, joinable)
        self.counters["requests"] += 1
        try:
            fresh = sharing.fresh
            if fresh:
                lane = self._embeds.existing(scope.params) or await self._new_lane(scope.params)
                queued = [Text(texts[k], trace, at, keep, failover) for k in fresh]
                if self._costed:
                    costs = [budget_tokens(t.text) for t in queued]
                else:
                    costs = [1] * len(fresh)
                spend = REQUEST_SPEND.get()  # a key with tpm reserves first (core/spend.py)
                if spend is None:
                    items = lane.batcher.submit(queued, costs, trace=trace, tenant=tenant)
                else:
                    items = await spend.queue(
                        sum(t.bound for t in queued),
                        lambda: lane.batcher.submit(queued, costs, trace=trace, tenant=tenant),
                    )
                sharing.lead(items, lane.requeue, tenant)
            joins = sharing.joins
            if joins:
                self.cache.counts.dedupe_joined += joins
            rows = await sharing.wait()
        except KeyRateLimitedError:
            raise  # the caller's key, not this provider, refused it
        except BaseException:
            self.counters["requests_failed"] += 1
            raise
        finally:
            sharing.finish()
        return rows, sharing.items()

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """Queue every document of ``request`` in its rerank lane and wait for all scores."""
        if self._closing:
            raise UnavailableError(f"provider {self.name} is shutting down")
        if self.rerank_lanes is None:
            raise InvalidRequestError(f"provider {self.name} does not rerank", param="model")
        self.last_kind = "rerank"
        trace = current_span_context() if self._tracer is not None else None
        return await self.rerank_lanes.rerank(request, trace)

    # -- status ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.provider.type,
            "model": self.provider.model,
            "endpoint": redact_query(getattr(self.provider, "url", None)),
            "proxy": redact_endpoint(self.config.proxy),
            "max_texts_per_call": self.provider.limits.max_texts,
            "max_tokens_per_call": self.provider.limits.max_tokens,
            **self._embeds.totals(),
            "max_batch_requests": self.aimd.size if self.aimd else self.ceiling,
            "aimd": self.aimd.snapshot() if self.aimd else None,
            "health": self.health.snapshot(),
            "counters": dict(self.counters),
            "rerank": self.rerank_lanes.stats() if self.rerank_lanes is not None else None,
            "lanes": self._embeds.describe(),
        }


def _joinable(flight: Flight[Any], at: float | None, keep: Scope | None, failover: bool) -> bool:
    """Whether a caller with deadline ``at`` (and ``failover``: another provider to go to) may
    wait on ``flight``.

    While its text is queued, yes: the text's deadline is widened to cover this caller too (its
    upstream call is bounded by its most patient caller), it is kept if this caller caches, and
    a caller with nowhere else to go makes its call wait out a 429. Once its call has started,
    only if the call's bound already covers this caller's deadline (a call cut short at another
    caller's deadline must not fail this one) and the call waits out a 429 if this caller needs
    it to.
    """
    item = flight.item
    future = item.future
    if future.done():
        # Answered, or dropped (its joiners queue it again): join. Failed: not this caller's
        # failure (another's deadline, its queue timeout): queue afresh.
        return future.cancelled() or future.exception() is None
    text: Text = item.payload
    bound = text.deadline
    if item.started_at == 0.0:
        wider = None if bound is None or at is None else max(bound, at)
        onward = text.failover and failover
        if wider != bound or (keep is not None and text.keep is None) or onward != text.failover:
            item.payload = text._replace(deadline=wider, keep=text.keep or keep, failover=onward)
        return True
    if text.failover and not failover:
        return False
    return bound is None or (at is not None and at <= bound)


def _cost(text: Text) -> int:
    """A queued text's weight against the upstream's token cap (``guard`` cuts by it)."""
    return budget_tokens(text.text)


def _unbound(text: Text) -> Text:
    """A text queued again for those who joined it: its deadline and failover were its
    leader's, who left; the joiners' own waits bound them (``Lane.requeue``), and a 429 is
    waited out for them as for any caller with nowhere else to go."""
    return text._replace(deadline=None, failover=False)
