"""The router: remote providers by name, routing policies, and the served remote models.

``Router`` owns the pooled HTTP client and one ``ProviderRuntime`` per configured provider, plus
two housekeeping tasks: the sweeper closes idle batch lanes, the prober sends a small request to
any provider whose circuit is half-open and gets no traffic. ``RemoteModel`` is the
``EmbeddingService`` a route is served as, ``RemoteRerankModel`` the ``RerankService`` of a
``kind = "rerank"`` route (``remote_model`` picks by kind); the gateway holds them.

Policies over an ordered provider list:
- ``any``: the first provider whose circuit lets calls through, or whose cache holds every text
  of an embedding request (``ProviderRuntime.cached_only``: cached texts outlive an outage); on a
  failure the next one. While a later provider could take the request, a 429 is not waited out
  (``http.FAILOVER``) and a provider still rate limited by one is passed over as an open
  circuit is (``ProviderHealth.limited_for``); the last provider it could use waits out
  Retry-After as a one-provider route does. When all fail, the caller gets the last error (429
  with the shortest Retry-After when every one of them was rate limited).
- ``all``: every provider at once; the result carries each provider's vectors
  (``EmbedResult.per_provider``) or scores (``RerankResult.per_provider``) and, in the main
  fields, the first provider's; the first failure fails the request and cancels the rest. An
  open provider answers what its cache holds whole (its runtime answers a full hit before any
  lane) and fails the request otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from embedplex.batching import BatchObserver
from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
from embedplex.core.errors import (
    ClientError,
    EmbedplexError,
    EmptyInputError,
    InvalidRequestError,
    KeyRateLimitedError,
    ModelNotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    UnavailableError,
    UpstreamRefusedError,
    UpstreamTimeoutError,
    shown,
)
from embedplex.core.types import (
    EmbeddingService,
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    RerankRequest,
    RerankResult,
    RerankService,
    Timings,
)
from embedplex.providers.base import RerankParams
from embedplex.providers.config import Policy, ProviderConfig, RouteConfig, check_run_time
from embedplex.providers.deadlines import deadline_timer, timed_out
from embedplex.providers.endpoints import GuardedBackend, parse_networks, proxy_host
from embedplex.providers.health import CircuitState
from embedplex.providers.http import FAILOVER
from embedplex.providers.runtime import ProviderRuntime
from embedplex.providers.wire import Proxy, wire_client

if TYPE_CHECKING:
    from embedplex.cache import EmbeddingCache
    from embedplex.observability import Telemetry

logger = logging.getLogger(__name__)

T = TypeVar("T")
Call = Callable[[ProviderRuntime], Awaitable[T]]
# What a route answers: the policies and the served models treat both kinds alike.
Result = TypeVar("Result", EmbedResult, RerankResult)
Request = TypeVar("Request", EmbedRequest, RerankRequest)


class Router:
    def __init__(
        self,
        providers: Sequence[ProviderConfig],
        *,
        idle_ttl: float = 300.0,
        probe_interval: float = 5.0,
        max_client_batch_size: int = 2048,
        client: httpx.AsyncClient | None = None,
        observers: list[BatchObserver] | None = None,
        allowed_networks: Sequence[str] = (),
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.idle_ttl = idle_ttl
        # The process's embedding cache, shared with the local models (one byte bound); None:
        # nothing kept (in-flight dedupe still applies). docs/cache.md.
        self.cache = cache
        self.probe_interval = probe_interval
        self.max_client_batch_size = max_client_batch_size
        self._own_client = client is None
        # The client connects through the endpoint guard (endpoints.py): hosts of the providers
        # configured here are trusted, any other (added at run time) must be allowed.
        self.guard = GuardedBackend(parse_networks(allowed_networks))
        # Creating it does no I/O; connections open on first use. httpx's API over aiohttp's
        # wire (wire.py: the cheaper one per call).
        self.client = client or self._wire()
        # Config-file providers behind a proxy: one client per proxy (``_client``).
        self._proxied: dict[str, httpx.AsyncClient] = {}
        self._observers = observers
        self._telemetry: Telemetry | None = None
        self.runtimes: dict[str, ProviderRuntime] = {}
        for config in providers:
            self._build(config, proxied=True)
        self.guard.trusted = frozenset(host for rt in self.runtimes.values() for host in _hosts(rt))
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False

    def _wire(self, proxy: Proxy | None = None) -> httpx.AsyncClient:
        return wire_client(
            self.guard,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            timeout=httpx.Timeout(15.0),
            proxy=proxy,
        )

    def _client(self, config: ProviderConfig, *, proxied: bool) -> httpx.AsyncClient:
        """The pooled client ``config``'s calls go out on: the router's, or, for a provider of
        the configuration that names a proxy (``proxied``), that proxy's own. A provider added
        at run time may not name one (``check_run_time``: the guard could not check its
        upstream's addresses)."""
        if config.proxy is None:
            return self.client
        if not proxied:
            check_run_time(config)
        client = self._proxied.get(config.proxy)
        if client is None:
            client = self._proxied[config.proxy] = self._wire(Proxy.parse(config.proxy))
        return client

    def _build(self, config: ProviderConfig, *, proxied: bool = False) -> ProviderRuntime:
        if config.name in self.runtimes:
            raise ValueError(f"two providers are named {config.name!r}")
        runtime = self._make(config, proxied=proxied)
        self.runtimes[config.name] = runtime
        return runtime

    def _make(self, config: ProviderConfig, *, proxied: bool = False) -> ProviderRuntime:
        runtime = ProviderRuntime.build(
            config,
            self._client(config, proxied=proxied),
            observers=self._observers,
            cache=self.cache,
        )
        if self._telemetry is not None:
            runtime.instrument(self._telemetry)
        return runtime

    def instrument(self, telemetry: Telemetry) -> None:
        """Report every provider, and those added later, to ``telemetry`` (before ``start``)."""
        self._telemetry = telemetry
        for runtime in self.runtimes.values():
            runtime.instrument(telemetry)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(rt.start() for rt in self.runtimes.values()))
        self._tasks = [
            asyncio.create_task(self._every(self.idle_ttl / 4, self.sweep), name="router:sweep"),
            asyncio.create_task(self._every(self.probe_interval, self.probe), name="router:probe"),
        ]
        self.started = True

    async def close(self, *, drain: bool = True) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(rt.close(drain=drain) for rt in self.runtimes.values()))
        if self._own_client:
            await self.client.aclose()
        for client in self._proxied.values():
            await client.aclose()

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def add(self, config: ProviderConfig) -> None:
        """Register a provider at run time (admin API); one that names a proxy is refused
        (ValueError: ``check_run_time``)."""
        runtime = self._build(config)
        try:
            await runtime.start()
        except BaseException:
            self.runtimes.pop(config.name, None)
            raise

    async def start_runtime(self, config: ProviderConfig) -> ProviderRuntime:
        """A runtime for ``config`` (a provider added at run time: the admin API, the state
        store), started but not yet routed to (``swap`` puts it in); one that names a proxy is
        refused (ValueError: ``check_run_time``)."""
        runtime = self._make(config)
        await runtime.start()
        return runtime

    def swap(self, runtime: ProviderRuntime) -> ProviderRuntime | None:
        """Route ``runtime``'s name to it from now on, in one step; the runtime it replaces
        (if any) is returned for the caller to close (its requests in flight finish there)."""
        old = self.runtimes.get(runtime.name)
        self.runtimes[runtime.name] = runtime
        return old

    def take(self, name: str) -> ProviderRuntime:
        """Stop routing to ``name``; the caller closes the runtime returned (a drain)."""
        runtime = self.runtimes.pop(name, None)
        if runtime is None:
            raise ModelNotFoundError(f"no provider named {shown(name)}", param="name")
        if self._telemetry is not None:  # its gauges go with it (its counts stay)
            self._telemetry.providers.forget(name)
        return runtime

    async def remove(self, name: str) -> None:
        await self.take(name).close(drain=True)

    # -- housekeeping ----------------------------------------------------------------------

    async def _every(self, period: float, job: Any) -> None:
        while True:
            await asyncio.sleep(max(0.05, period))
            try:
                await job()
            except Exception:  # housekeeping must outlive one bad round
                logger.exception("router housekeeping failed")

    async def sweep(self) -> int:
        """Close batch lanes idle for ``idle_ttl``; return how many."""
        counts = await asyncio.gather(*(rt.sweep(self.idle_ttl) for rt in self.runtimes.values()))
        return sum(counts)

    async def probe(self) -> None:
        """Send one small request to every half-open provider that no caller is probing."""
        due = [
            rt
            for rt in self.runtimes.values()
            if rt.health.state is CircuitState.HALF_OPEN and rt.health.available()
        ]
        for rt in due:
            rt.counters["probes"] += 1
        await asyncio.gather(*(rt.probe() for rt in due), return_exceptions=True)

    # -- routing ---------------------------------------------------------------------------

    def runtime(self, name: str) -> ProviderRuntime:
        runtime = self.runtimes.get(name)
        if runtime is None:
            known = ", ".join(sorted(self.runtimes)) or "none"
            raise ModelNotFoundError(
                f"provider {shown(name)} is not configured (providers: {known})", param="providers"
            )
        return runtime

    def _runtimes(self, n: int, param: str, providers: Sequence[str]) -> list[ProviderRuntime]:
        if n == 0:
            raise EmptyInputError(f"{param} cannot be empty", param=param)
        if n > self.max_client_batch_size:
            raise PayloadTooLargeError(
                f"batch size {n} > maximum allowed batch size {self.max_client_batch_size}",
                param=param,
            )
        if len(providers) == 1:  # most routes: no repeats to drop
            return [self.runtime(providers[0])]
        # dict.fromkeys: keep the order, drop repeats ("all" answers once per provider).
        runtimes = [self.runtime(name) for name in dict.fromkeys(providers)]
        if not runtimes:
            raise ModelNotFoundError("the request names no provider", param="providers")
        return runtimes

    def embed_targets(self, n: int, providers: Sequence[str]) -> list[ProviderRuntime]:
        """The providers a request of ``n`` inputs may go to, checked as ``embed`` checks them
        (an empty or too large request, an unknown provider: refused here)."""
        return self._runtimes(n, "input", providers)

    async def embed(
        self, request: EmbedRequest, providers: Sequence[str], policy: Policy = "any"
    ) -> EmbedResult:
        runtimes = self.embed_targets(len(request.inputs), providers)
        return await _route(
            runtimes, policy, lambda rt: rt.embed(request), lambda rt: rt.cached_only(request)
        )

    async def rerank(
        self, request: RerankRequest, providers: Sequence[str], policy: Policy = "any"
    ) -> RerankResult:
        """Scores for ``request.texts`` from ``providers`` under ``policy`` (as ``embed``)."""
        runtimes = self._runtimes(len(request.texts), "texts", providers)
        return await _route(runtimes, policy, lambda rt: rt.rerank(request))

    def stats(self) -> dict[str, Any]:
        return {name: rt.stats() for name, rt in self.runtimes.items()}


def _hosts(rt: ProviderRuntime) -> list[str]:
    """The hosts a provider's calls go to (embeddings and rerank URLs), and its proxy's: the
    one connected to through it."""
    urls = [getattr(rt.provider, "url", None), getattr(rt.provider, "rerank_url", None)]
    hosts = [httpx.URL(u).host for u in urls if isinstance(u, str)]
    if rt.config.proxy is not None:
        hosts.append(proxy_host(rt.config.proxy)[0])
    return hosts


async def _route(
    runtimes: list[ProviderRuntime],
    policy: Policy,
    call: Call[Result],
    cached: Call[Result | None] | None = None,
) -> Result:
    """``call`` on ``runtimes`` under ``policy`` (see the module docstring); ``cached``: what a
    provider whose circuit is open can answer without its upstream (``any`` asks it)."""
    if policy == "all":
        return _merge(runtimes, await _all(runtimes, call))
    return await _any(runtimes, call, cached)


async def _any(
    runtimes: list[ProviderRuntime], call: Call[T], cached: Call[T | None] | None = None
) -> T:
    errors: list[EmbedplexError] = []
    last = len(runtimes) - 1
    for i, rt in enumerate(runtimes):
        health = rt.health
        # A later provider that could take the request: then a 429 here is not waited out,
        # and a provider still rate limited is passed over (the module docstring).
        onward = i < last and any(_open(r) for r in runtimes[i + 1 :])
        if not health.available() or (onward and health.limited_for()):
            answer = None if cached is None else await cached(rt)
            if answer is not None:
                return answer
            errors.append(_circuit_refusal(rt))
            continue
        token = FAILOVER.set(onward)
        try:
            return await call(rt)
        except UpstreamRefusedError as exc:  # this upstream's limit (its context length, say):
            rt.counters["failovers"] += 1  # another provider may take the input
            errors.append(exc)
        except (ClientError, KeyRateLimitedError):
            raise  # the request itself is wrong, or its key over its limits: not the provider
        except EmbedplexError as exc:
            rt.counters["failovers"] += 1
            errors.append(exc)
        finally:
            FAILOVER.reset(token)
    raise _pick_error(errors)


def _open(rt: ProviderRuntime) -> bool:
    """Whether ``_any`` would call ``rt`` now: its circuit lets calls through, no 429 holds it."""
    return rt.health.available() and not rt.health.limited_for()


def _circuit_refusal(rt: ProviderRuntime) -> EmbedplexError:
    """Why ``rt`` is not tried: its circuit lets no call through, or a 429 still holds it."""
    health = rt.health
    if health.available():
        wait = health.limited_for()
        return RateLimitedError(
            f"provider {rt.name}: rate limited for another {wait:.3g}s", retry_after=wait
        )
    return UnavailableError(f"provider {rt.name}: circuit is {health.state.value}")


async def _all(runtimes: list[ProviderRuntime], call: Call[T]) -> list[T]:
    tasks = [asyncio.ensure_future(call(rt)) for rt in runtimes]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            error = task.exception() if task in done else None
            if error is not None:
                raise error
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def _merge(runtimes: list[ProviderRuntime], results: list[Result]) -> Result:
    """The ``all`` policy's answer: the first provider's, with every provider's kept beside it.

    A merged rerank result still names the first provider; a merged embedding names none
    (``provider`` stays None), as their APIs have always answered.
    """
    first = results[0]
    return dataclasses.replace(
        first,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        timings=Timings(
            queue=max(r.timings.queue for r in results),
            inference=max(r.timings.inference for r in results),
            total=max(r.timings.total for r in results),
        ),
        provider=first.provider if isinstance(first, RerankResult) else None,
        per_provider={r.provider or rt.name: r for r, rt in zip(results, runtimes, strict=True)},
    )


def _expired(deadline: Deadline, model: str) -> UpstreamTimeoutError:
    return UpstreamTimeoutError(
        f"{model}: no answer from the upstream within {deadline.describe()}"
    )


def _within(deadline: Deadline, model: str, answer: Awaitable[Result]) -> Awaitable[Result]:
    """``answer`` by ``deadline``, else a 504 that names it. Leaving cancels the caller's
    queued texts, and an upstream call all of whose callers left is cancelled too
    (``BatchPolicy.cancel_abandoned``): no attempt runs for nobody. One timer for all
    requests (``providers/deadlines.py``), not one each."""
    return deadline_timer().run(deadline.at, answer, lambda: _expired(deadline, model))


def _pick_error(errors: list[EmbedplexError]) -> EmbedplexError:
    limited = [e for e in errors if isinstance(e, RateLimitedError)]
    if limited and len(limited) == len(errors):
        waits = [e.retry_after for e in limited if e.retry_after is not None]
        return RateLimitedError(
            "every provider is rate limited: " + "; ".join(e.message for e in limited),
            retry_after=min(waits) if waits else None,
        )
    if len(errors) == 1:
        return errors[0]
    return _restated(errors[-1], "every provider failed: " + "; ".join(e.message for e in errors))


def _restated(error: EmbedplexError, message: str) -> EmbedplexError:
    """A new error of ``error``'s type and fields (status, retry_after...) saying ``message``.

    ``error`` is shared: a failed batch hands one exception to every caller it carried, so
    writing this caller's message into it grew every other caller's message too.
    """
    out = type(error).__new__(type(error))
    out.__dict__.update(error.__dict__)
    out.message = message
    out.args = (message,)
    out.__cause__ = error
    return out


class RemoteRoute:
    """A route served as a model: a name answered by providers under a policy.

    The part embed and rerank routes share; ``RemoteModel`` and ``RemoteRerankModel`` add the
    call. Always ready (see ``health``); the router owns and closes the providers.
    """

    kind = "embedding"  # ModelInfo.kind: what the gateway's pick(name, kind) matches

    def __init__(self, router: Router, route: RouteConfig) -> None:
        self.router = router
        self.route = route
        self._info = ModelInfo(
            name=route.model,
            model_id=route.model,
            sha=None,
            backend="remote",
            device="remote",
            dtype="float32",
            dim=0,  # unknown until the first answer; providers do not advertise it
            pooling="remote",
            max_input_length=0,
            prompts={},
            kind=self.kind,
        )
        self._active = 0

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def start(self) -> None:
        for name in self.route.providers:
            self.router.runtime(name)  # fail early on a route to an unknown provider

    async def close(self, *, drain: bool = True) -> None:
        """The router owns the providers and closes them."""

    def health(self) -> None:
        """Always ready: a router whose upstreams are down still answers (with 503s), and
        taking it out of a load balancer would not bring them back. See /api/v1/status."""

    async def _serve(
        self, call: Callable[[Request, Sequence[str], Policy], Awaitable[Result]], request: Request
    ) -> Result:
        """``call`` (the router's embed or rerank) for this route, answered under its name."""
        self._active += 1
        try:
            deadline = REQUEST_DEADLINE.get()
            if deadline is None:
                result = await call(request, self.route.providers, self.route.policy)
            else:
                result = await _within(
                    deadline,
                    self.route.model,
                    call(request, self.route.providers, self.route.policy),
                )
        finally:
            self._active -= 1
        result.model = self.route.model
        return result

    def _lane_stats(self, per: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The part of each provider's stats that counts this route's kind of call."""
        return per

    # The key, in ``_lane_stats``, of what one upstream call may carry.
    _call_size = "max_batch_requests"

    def stats(self) -> dict[str, Any]:
        known = self.router.runtimes
        per = [known[n].stats() for n in self.route.providers if n in known]
        lanes = self._lane_stats(per)
        return {
            "kind": "remote",
            "policy": self.route.policy,
            "providers": self.route.providers,
            "active_requests": self._active,
            "queued": sum(s["queued"] for s in lanes),
            "in_flight_batches": sum(s["in_flight_batches"] for s in lanes),
            "batches": sum(s["batches"] for s in lanes),
            "max_batch_requests": min((s[self._call_size] for s in lanes), default=0),
            "circuits": {s["name"]: s["health"]["circuit"] for s in per},
        }


class RemoteModel(RemoteRoute):
    """An embedding route (``kind = "embed"``): an ``EmbeddingService``."""

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """``_serve`` of ``Router.embed``, written out: the routed embed path is the hot one.

        A route to one provider (not ``all``) calls it straight, as ``_any`` over that one would
        (a circuit that is not letting calls through: the cache's answer, else 503; a failure
        counts a failover), and bounds the wait by the request's deadline as ``_within`` does,
        without their coroutines (one frame each, made and resumed per request).
        """
        route = self.route
        self._active += 1
        try:
            runtimes = self.router.embed_targets(len(request.inputs), route.providers)
            rt = runtimes[0] if len(runtimes) == 1 and route.policy != "all" else None
            deadline = REQUEST_DEADLINE.get()
            entry = None if deadline is None else deadline_timer().enter(deadline.at)
            refusal: EmbedplexError | None = None  # raised after the try: not a failover
            try:
                if rt is None:
                    result = await _route(
                        runtimes,
                        route.policy,
                        lambda r: r.embed(request),
                        lambda r: r.cached_only(request),
                    )
                elif rt.health.available():
                    result = await rt.embed(request)
                else:  # an outage: the cache's answer if it holds every text (Redis included,
                    # so within the deadline like any wait)
                    cached = await rt.cached_only(request)
                    if cached is None:
                        refusal = _circuit_refusal(rt)
                    else:
                        result = cached
            except asyncio.CancelledError:
                if entry is not None and deadline is not None and timed_out(entry):
                    raise _expired(deadline, route.model) from None
                raise
            except (ClientError, KeyRateLimitedError):
                raise  # the request is wrong, or its key over its limits: not the provider
            except EmbedplexError:
                if rt is not None:
                    rt.counters["failovers"] += 1
                raise
            finally:
                if entry is not None:
                    entry.task = None
            if refusal is not None:
                raise refusal
        finally:
            self._active -= 1
        result.model = route.model
        return result


class RemoteRerankModel(RemoteRoute):
    """A rerank route (``kind = "rerank"``): a ``RerankService`` served on /rerank, /v1/rerank."""

    kind = "reranker"

    async def start(self) -> None:
        """Fail at start-up on a provider that cannot rerank (no rerank URL to call)."""
        for name in self.route.providers:
            lanes = self.router.runtime(name).rerank_lanes
            try:
                if lanes is None:
                    raise InvalidRequestError(f"provider {name} does not rerank")
                lanes.reranker.check_rerank(RerankParams())
            except InvalidRequestError as exc:
                raise ValueError(f"route {self.route.model!r}: {exc.message}") from exc

    async def rerank(self, request: RerankRequest) -> RerankResult:
        return await self._serve(self.router.rerank, request)

    _call_size = "max_documents_per_call"

    def _lane_stats(self, per: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s["rerank"] for s in per if s.get("rerank")]


def remote_model(router: Router, route: RouteConfig) -> EmbeddingService | RerankService:
    """The served model of a ``[[routes]]`` entry, by its ``kind``."""
    if route.kind == "rerank":
        return RemoteRerankModel(router, route)
    return RemoteModel(router, route)
