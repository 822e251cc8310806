"""A model served by Ray Serve replicas, seen from the gateway (docs/ray.md).

``RayModel`` implements the same protocol as a local model; each request goes to a replica
through Serve's ``DeploymentHandle`` (Serve picks the replica) and the replica batches it with
embedplex's own batcher (``embedplex/ray/replica.py``). What can go wrong is mapped here, once:

- a replica that dies (or cannot be reached) while it holds a request: the request is retried
  once (every operation is idempotent; Serve's router drops the dead replica, so the retry
  goes to another); if the retry fails too, the caller gets 503. Ray restarts the replica.
- Serve's own backpressure: 429; any other Ray failure: 503, its detail only in the log.
- a replica that does not answer (stuck, stopped, unreachable): the call is bounded by the
  request's deadline (504 naming it, as a remote model's) and, without one, by what a local
  model's request may take (``call_bound``: 503); either way the Ray call is cancelled.
- an ``EmbedplexError`` the replica raised (a bad input, its queue timed out) reaches the
  caller as itself.
- an operation newer than the replicas (``wire.py``: a replica of an older release lacks the
  method): 422 naming the version, before any call, when the replicas said so; 503 when one
  replica of a rolling upgrade turns out to lack it (after one retry).

Every route that reaches a local model reaches a Ray one the same way: ``embed``, ``rerank``,
``tokenize``, ``embed_all`` and ``decode`` run in a replica (the model and its tokenizer live
there), each answering what the local model answers; the routes' own checks (input counts,
token bounds) run in the gateway for both, and so do the model's own checks made before its
inputs queue (``checks.py``: empty input, ``max_client_batch_size``, ``dimensions``,
``prompt_name``), before any replica is called. A key's ``tpm`` reserves an ``embed``,
``rerank`` or ``embed_all`` call's tokens before the call is made, as it reserves a local
model's inputs before they queue (``ray_spend.py``; a refusal is the key's 429, and no call).

Replica states are read from ``serve.status()`` every ``STATUS_INTERVAL_S`` (not per request):
readiness is false while no replica runs (unless the model scales to zero), and the status and
metrics show them. A read is bounded (``STATUS_TIMEOUT_S``): while the status cannot be read
(the cluster is gone) the model is not ready and calls are refused at once, 503 with
``Retry-After``. Deploying and connecting are ``ray_deploy.py``'s. An application
found gone (deleted by hand, or by a gateway with ``ray_delete_on_close``) is deployed again,
or attached to if another gateway deployed it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import typing
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from embedplex.backends.tokenizer import Token
from embedplex.batching.admission import Slots
from embedplex.core.deadline import REQUEST_DEADLINE, Deadline, within
from embedplex.core.errors import (
    EmbedplexError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    UnavailableError,
    UpstreamTimeoutError,
)
from embedplex.core.spend import REQUEST_SPEND, Spend
from embedplex.core.tenant import ANONYMOUS, Tenant
from embedplex.core.types import (
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    RerankRequest,
    RerankResult,
    TokenEmbedResult,
)
from embedplex.models.checks import check_dimensions, check_size, named_prompt
from embedplex.models.config import ModelConfig
from embedplex.models.ray_deploy import (
    ServeState,
    deploy_model,
    short,
)
from embedplex.models.ray_errors import RayErrors, lacks, ray_errors
from embedplex.models.ray_spend import RayCall, ray_call
from embedplex.ray.wire import (
    SINCE,
    WIRE_VERSION,
    Answer,
    DecodeAnswer,
    DecodeCall,
    EmbedAnswer,
    RerankAnswer,
    TokenEmbedAnswer,
    TokenizeCall,
    TokensAnswer,
    app_name,
)
from embedplex.serve.process_tuning import run_lowered

if TYPE_CHECKING:
    from embedplex.config import Settings
    from embedplex.observability import Telemetry
    from embedplex.observability.model_metrics import ModelMetrics
    from embedplex.observability.ray_metrics import RayMetrics

logger = logging.getLogger(__name__)

STATUS_INTERVAL_S = 2.0  # how often replica states are read from Serve's controller
# How often replicas found too old for an operation are asked their version again (an upgrade).
VERSION_RECHECK_S = STATUS_INTERVAL_S
VERSION_PROBE_TIMEOUT_S = 10.0
# Without a request deadline, a call may take what a local model's request may (its inputs'
# queue timeout, then the watchdog's bound on a pass) and this much more: the Ray hop, and
# tokenizing in the replica before its inputs queue.
CALL_MARGIN_S = 5.0
# Gateways that find their application gone wait up to this (at random) before deploying it
# again, so that of several sharing it, one deploys and the others find it deploying.
REDEPLOY_JITTER_S = STATUS_INTERVAL_S
# The longest one read of Serve's status may take: serve.status() blocks once the cluster is
# gone (until Ray ends the process, docs/ray.md "Losing the cluster").
STATUS_TIMEOUT_S = 2 * STATUS_INTERVAL_S


class RayModel:
    """Replicas on Ray Serve behind one served name.

    ``errors``: the Ray exception classes to map, by what they mean (``ray_errors()``); a test
    passes its own. ``owned``: whether this gateway deployed the application (then it deletes
    it on close, with ``ray_delete_on_close``); one deployed with Ray's tooling is only used.
    ``read_states``: the replicas' states by Serve's status (blocking), None when the
    application is gone; ``recover``: then deploys it again, or attaches to it if it is back
    (blocking), and returns its handle and whether it deployed it. ``wire``: the replicas' wire
    version (``wire.py``), as ``deploy`` read it. ``inference_timeout_s``: the process's
    watchdog setting, for ``call_bound``.
    """

    def __init__(
        self,
        config: ModelConfig,
        handle: Any,  # a Serve DeploymentHandle: handle.embed.remote(request) (tests: a fake)
        info: ModelInfo,
        *,
        errors: RayErrors,
        owned: bool = False,
        read_states: Callable[[], ServeState | dict[str, int] | None] | None = None,
        delete: Callable[[], None] | None = None,
        recover: Callable[[], tuple[Any, bool]] | None = None,
        wire: int = WIRE_VERSION,
        inference_timeout_s: float = 60.0,
    ) -> None:
        self.config = config
        self.app = app_name(config.name)
        self._handle = handle
        self._info = info
        self._errors = errors
        self.owned = owned
        self._read_states = read_states
        self._delete = delete
        self._recover = recover
        self.bound_s = call_bound(config, inference_timeout_s)
        self._states: dict[str, int] = {"RUNNING": 1}  # deploy() returned: it is running
        self._state = ServeState(self._states)
        self._status_error: str | None = None
        self._reading: asyncio.Future[ServeState | dict[str, int] | None] | None = None
        self._known: set[str] = set()  # replicas that had answered when the read began
        self._poller: asyncio.Task[None] | None = None
        self._metrics: RayMetrics | None = None
        self._served: ModelMetrics | None = None  # inputs and tokens, as a local model's
        self._per_replica: Counter[str] = Counter()
        self.retries = 0
        self.failures = 0
        limit = (config.max_concurrent_requests or 512) * _most_replicas(config)
        self._slots = Slots(
            limit,
            full=lambda n: (
                f"{n} requests in flight to {config.name}'s Ray replicas (at most {limit})"
            ),
            what=f"requests in flight to {config.name}'s Ray replicas",
        )
        self.wire = wire
        self._wire_checked = time.monotonic()

    @classmethod
    def deploy(cls, settings: Settings, config: ModelConfig) -> RayModel:
        """Connect to Ray, deploy the model's application (or attach to a running one) and
        wait until it answers (``ray_deploy.deploy_model``). Blocking: the gateway builds
        models in a thread."""
        app = deploy_model(settings, config)
        return cls(
            config,
            app.handle,
            app.info,
            errors=ray_errors(),
            owned=app.owned,
            read_states=app.read_states,
            delete=app.delete,
            recover=app.recover,
            wire=app.wire,
            inference_timeout_s=settings.inference_timeout_s,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def instrument(self, telemetry: Telemetry) -> None:
        self._metrics = telemetry.metrics.ray
        self._served = telemetry.metrics.model(self.config.name)

    async def start(self) -> None:
        if self._read_states is not None:
            await self._poll_once()
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self, *, drain: bool = True) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._reading is not None:  # a read still blocked: its thread is left to end
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        if self.owned and self.config.ray_delete_on_close and self._delete is not None:
            logger.info("%s: deleting Ray Serve application %s", self.config.name, self.app)
            try:
                await asyncio.to_thread(self._delete)
            except Exception:
                logger.exception("%s: deleting %s failed", self.config.name, self.app)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            await self._poll_once()

    async def _poll_once(self) -> None:
        """One read of Serve's status, bounded by ``STATUS_TIMEOUT_S``: ``serve.status()``
        blocks once the cluster is gone, and a read that never returned left the last states
        standing (ready, while every call waited out its deadline). A read still blocked is
        waited for again at the next poll, never started twice."""
        assert self._read_states is not None
        if self._reading is None:
            self._reading = asyncio.ensure_future(run_lowered(self._read_states, 0))
            self._known = set(self._per_replica)
        reading = self._reading
        await asyncio.wait({reading}, timeout=STATUS_TIMEOUT_S)
        if not reading.done():
            self._cannot_read(f"no answer within {STATUS_TIMEOUT_S:g}s")
            return
        self._reading = None
        exc = reading.exception()
        if exc is not None:
            # Probes (unauthenticated) and clients see the type; the log has its text too,
            # which may name the cluster's addresses and paths.
            self._cannot_read(type(exc).__name__, detail=short(str(exc)))
            return
        if self._status_error is not None:
            logger.info("%s: Ray Serve's status can be read again", self.config.name)
        self._status_error = None
        read = reading.result()
        state = ServeState(read) if isinstance(read, dict) else read
        self._state = state or ServeState({})
        self._states = self._state.replicas
        if self._state.live is not None:
            self._forget(self._known - self._state.live)
        if self._metrics is not None:
            self._metrics.on_replicas(self.config.name, self._states)
        if state is None and self._recover is not None:
            await self._redeploy()

    def _cannot_read(self, why: str, *, detail: str = "") -> None:
        """Not ready, and calls refused at once (503), until a read succeeds. ``why`` is shown
        to probes and clients; ``detail`` only logged."""
        if self._status_error is None:
            logger.warning(
                "%s: cannot read Ray Serve's status: %s",
                self.config.name,
                f"{why}: {detail}" if detail else why,
            )
        self._status_error = why

    def _forget(self, gone: set[str]) -> None:
        """Replicas no longer alive: out of the status and the metrics (every restart added
        one more series)."""
        for replica in gone:
            self._per_replica.pop(replica, None)
        if gone and self._metrics is not None:
            self._metrics.forget_replicas(self.config.name, gone)

    async def _redeploy(self) -> None:
        """The application is gone: deploy it again (or attach to it, if another gateway
        sharing it did first). Two gateways that deploy it at once both succeed: Serve takes
        the second ``serve.run`` as an update of the same application (its replicas are
        replaced once more), so the jitter only saves that work."""
        assert self._recover is not None
        await asyncio.sleep(random.uniform(0, REDEPLOY_JITTER_S))
        try:
            handle, deployed = await asyncio.to_thread(self._recover)
        except Exception as exc:  # tried again at the next poll that finds it gone
            logger.error("%s: cannot deploy %s again: %s", self.config.name, self.app, exc)
            return
        self._handle = handle
        self.owned = deployed  # the next poll reads its replicas

    def health(self) -> None:
        if self._status_error is not None:
            raise NotReadyError(f"cannot read Ray Serve's status ({self._status_error})")
        scales_to_zero = self.config.autoscaling is not None and (
            self.config.autoscaling.min_replicas == 0
        )
        if scales_to_zero and self._state.failed is None:
            return  # no replica until a request comes: Serve starts one for it
        if not self._states.get("RUNNING"):
            states = ", ".join(f"{k} {v}" for k, v in sorted(self._states.items())) or "none"
            raise NotReadyError(f"no Ray replica is running (replicas: {states})")

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self._info.kind,
            "runtime": "ray",
            "app": self.app,
            "replicas": dict(self._states),
            "requests_per_replica": dict(self._per_replica),
            "retries": self.retries,
            "replica_failures": self.failures,
            "wire_version": self.wire,
            "active_requests": self._slots.total,
            "queued": 0,  # queues are in the replicas
            "in_flight_batches": 0,
            "batches": 0,
            "max_batch_requests": self._info.max_batch_requests or 0,
        }

    def admit(self, tenant: Tenant = ANONYMOUS, *, note: bool = True) -> None:
        """The gateway's cap for this model: each replica's ``max_concurrent_requests`` times
        the most replicas it may have (each replica also admits on its own), and past
        three quarters of it, the key's fair share (``batching/admission.py``), as a local
        model's."""
        self._slots.check(tenant, note=note)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._check_size(len(request.inputs), "input")
        check_dimensions(request.dimensions, self._info.dim)
        self._check_prompt(request)
        answer = typing.cast(EmbedAnswer, await self._call("embed", request))
        self._count(len(answer.matrix), answer.prompt_tokens)
        return EmbedResult(
            vectors=list(answer.matrix),
            prompt_tokens=answer.prompt_tokens,
            model=self._info.name,
            timings=answer.timings,
        )

    async def rerank(self, request: RerankRequest) -> RerankResult:
        self._check_size(len(request.texts), "texts")
        answer = typing.cast(RerankAnswer, await self._call("rerank", request))
        self._count(len(answer.scores), answer.prompt_tokens)
        return RerankResult(
            scores=answer.scores,
            prompt_tokens=answer.prompt_tokens,
            model=self._info.name,
            timings=answer.timings,
        )

    async def tokenize(
        self, texts: list[str], *, add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        """TEI ``/tokenize`` in a replica (the tokenizer is there). Not admitted against the
        model's cap, as a local model's is not: it never queues for inference."""
        check_size(len(texts), "inputs", None)
        if prompt_name is not None:
            named_prompt(prompt_name, self._info.prompts)
        call = TokenizeCall(texts, add_special_tokens, prompt_name)
        answer = await self._call("tokenize", call, admit=False)
        return typing.cast(TokensAnswer, answer).rows()

    async def embed_all(self, request: EmbedRequest) -> TokenEmbedResult:
        self._check_size(len(request.inputs), "inputs")
        self._check_prompt(request)
        answer = typing.cast(TokenEmbedAnswer, await self._call("embed_all", request))
        self._count(len(answer.lengths), answer.prompt_tokens)
        return TokenEmbedResult(
            vectors=answer.vectors(),
            prompt_tokens=answer.prompt_tokens,
            model=self._info.name,
            timings=answer.timings,
        )

    async def decode(self, sequences: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        """TEI ``/decode`` in a replica; not admitted against the model's cap (as ``tokenize``)."""
        self._check_size(len(sequences), "ids")
        call = DecodeCall(sequences, skip_special_tokens)
        answer = await self._call("decode", call, admit=False)
        return typing.cast(DecodeAnswer, answer).texts

    def _count(self, inputs: int, tokens: int) -> None:
        if self._served is not None:
            self._served.on_served(inputs, tokens)

    def _check_size(self, n: int, param: str) -> None:
        """As the local model checks it (the replica would, after a Ray round trip): the
        replicas' own ``max_client_batch_size``, else this table's."""
        check_size(n, param, self._info.max_client_batch_size or self.config.max_client_batch_size)

    def _check_prompt(self, request: EmbedRequest) -> None:
        """A text request's ``prompt_name`` (token ids take none; a ``prompt`` wins)."""
        if request.prompt_name is not None and request.prompt is None and not request.is_tokens:
            named_prompt(request.prompt_name, self._info.prompts)

    async def _call(self, method: str, request: object, *, admit: bool = True) -> Answer:
        """``method`` of a replica; ``admit``: counted against (and refused beyond) the cap,
        and reserved against a key's ``tpm`` (``core/spend.py``), as a local model's inputs
        are when they queue."""
        self._check_status()
        await self._check_version(method)
        spend: Spend | None = None
        tenant: Tenant = getattr(request, "tenant", ANONYMOUS)  # embed, rerank, embed_all
        if admit:
            self._slots.take(tenant)
            spend = REQUEST_SPEND.get()  # a key with tpm
        try:
            if spend is None:
                answer = await self._remote(method, request)
            else:
                answer = await self._reserved(spend, method, request)
        finally:
            if admit:
                self._slots.release(tenant)
        if isinstance(answer, EmbedplexError):
            raise answer
        replica = typing.cast(Answer, answer).replica
        self._per_replica[replica] += 1
        if self._metrics is not None:
            self._metrics.on_answer(self.config.name, replica)
        return typing.cast(Answer, answer)

    def _check_status(self) -> None:
        """While Serve's status cannot be read (the cluster is gone or unreachable), 503 at
        once: a call would wait out its whole deadline."""
        if self._status_error is not None:
            raise UnavailableError(
                f"model {self.config.name!r}: its Ray cluster cannot be reached (Serve's "
                f"status: {self._status_error}); retry later",
                retry_after=STATUS_INTERVAL_S,
            )

    async def _reserved(self, spend: Spend, method: str, request: object) -> object:
        """``_remote`` for a key with ``tpm``: the call's tokens are reserved first (a refusal,
        the key's 429, makes no call), and it is noted as a queued input, so that a request
        ending without an answer once the call was sent is charged its estimate
        (``ray_spend.py``)."""
        call = ray_call(request, self._info, self.config)
        await spend.queue(call.bound, lambda: (call,))
        try:
            answer = await self._remote(method, request, call)
        except BaseException as exc:
            call.ended(exc)
            raise
        call.ended(answer if isinstance(answer, EmbedplexError) else None)
        return answer

    async def _check_version(self, method: str) -> None:
        """422 (InvalidRequestError) when the replicas are too old for ``method``; they are
        asked again (at most every ``VERSION_RECHECK_S``) in case the application was upgraded
        since."""
        needed = SINCE.get(method, 1)
        if self.wire >= needed:
            return
        now = time.monotonic()
        if now - self._wire_checked >= VERSION_RECHECK_S:
            self._wire_checked = now
            # A replica without the method (or none reachable in time): still too old.
            with contextlib.suppress(Exception):
                probe = self._handle.wire_version.remote()
                self.wire = int(await asyncio.wait_for(probe, VERSION_PROBE_TIMEOUT_S))
        if self.wire < needed:
            raise InvalidRequestError(
                f"model {self.config.name!r} is served by Ray replicas of an older embedplex "
                f"(wire version {self.wire}) without {method}, which needs version {needed}; "
                f"redeploy the Serve application {self.app} with this release",
                param="model",
            )

    async def _remote(self, method: str, request: object, call: RayCall | None = None) -> object:
        """``_attempts`` within the request's deadline (504 past it, naming it, as a remote
        model's), or within ``bound_s`` when that comes first or there is no deadline (503, as a
        local model's queue timeout): a replica that never answers (stuck, stopped) must not
        hold its caller until Serve's health check replaces it, a minute or more later.
        ``call``: a reserved request's, stamped when the call is sent."""
        deadline = REQUEST_DEADLINE.get()
        wait = deadline.remaining() if deadline is not None else None
        if self.bound_s is not None and (wait is None or self.bound_s < wait):
            wait, deadline = self.bound_s, None
        if wait is None:
            return await self._attempts(method, request, call)
        if wait <= 0:  # spent before the call (tokenizing, a version probe): no call for nobody
            raise self._timed_out(deadline)
        return await within(
            self._attempts(method, request, call), wait, lambda: self._timed_out(deadline)
        )

    def _timed_out(self, deadline: Deadline | None) -> EmbedplexError:
        name = self.config.name
        if deadline is not None:  # the caller's choice: not a replica failure
            return UpstreamTimeoutError(
                f"model {name!r}: no answer from its Ray replica within {deadline.describe()}"
            )
        self.failures += 1
        logger.warning("%s: no answer from a Ray replica within %gs", name, self.bound_s)
        return UnavailableError(
            f"model {name!r}: no answer from its Ray replica within {self.bound_s:g}s "
            f"(queue_timeout_ms + inference_timeout_s + {CALL_MARGIN_S:g}s); retry later"
        )

    async def _attempts(self, method: str, request: object, call: RayCall | None) -> object:
        name = self.config.name
        errors = self._errors
        for attempt in (1, 2):
            if call is not None:
                call.sent()
            try:
                return await _cancelled_with(getattr(self._handle, method).remote(request))
            except errors.overloaded as exc:
                msg = f"{name}: Ray Serve refused the request (its queue is full)"
                raise OverloadedError(msg, retry_after=1) from exc
            except errors.replica_lost as exc:
                lost: BaseException = exc
                why = f"replica lost ({type(exc).__name__})"
                failed = "its Ray replica failed while serving the request, and so did the retry"
            except errors.other as exc:
                if not lacks(exc, method, errors):
                    self.failures += 1
                    logger.error("%s: Ray call failed: %r", name, exc)
                    raise UnavailableError(
                        f"model {name!r}: the Ray deployment could not serve the request"
                    ) from exc
                # One replica of a rolling upgrade is older: another may have the method.
                lost = exc
                why = f"a replica has no {method}"
                failed = (
                    f"the Ray replica that took the request runs an older embedplex without "
                    f"{method} (an upgrade in progress?), and so did the retry's"
                )
            if attempt == 1:
                self._retrying(why)
                continue
            self.failures += 1
            raise UnavailableError(
                f"model {name!r}: {failed}; retry later", retry_after=1
            ) from lost
        raise AssertionError("unreachable")

    def _retrying(self, why: str) -> None:
        self.retries += 1
        if self._metrics is not None:
            self._metrics.on_retry(self.config.name)
        logger.warning("%s: %s; retrying once", self.config.name, why)


async def _cancelled_with(response: Any) -> object:
    """``response`` (a Serve ``DeploymentResponse``), cancelled in Ray too when its caller
    leaves (a deadline, a disconnect): awaiting it is cancelled, the request is not, and would
    stay queued in (or run on) its replica for nobody."""
    try:
        return await response
    except asyncio.CancelledError:
        cancel = getattr(response, "cancel", None)  # a test's fake may have none
        if cancel is not None:
            with contextlib.suppress(Exception):  # best effort, as Serve's is
                cancel()
        raise


def call_bound(config: ModelConfig, inference_timeout_s: float) -> float | None:
    """The longest a call to a replica may take without a request deadline: what a local
    model's request may (its inputs wait at most ``queue_timeout_ms``, then each pass at most
    ``inference_timeout_s``) and ``CALL_MARGIN_S``; None without a watchdog (a local pass is
    not bounded either)."""
    if inference_timeout_s <= 0:
        return None
    # A table not resolved against the settings (tests) has none: the settings' default.
    from embedplex.config import Settings

    queue_ms = config.queue_timeout_ms or Settings.model_fields["queue_timeout_ms"].default
    return queue_ms / 1000 + inference_timeout_s + CALL_MARGIN_S


def _most_replicas(config: ModelConfig) -> int:
    if config.autoscaling is not None:
        return config.autoscaling.max_replicas
    return config.replicas or 1
