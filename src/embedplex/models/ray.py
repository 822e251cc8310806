"""A model served by Ray Serve replicas, seen from the gateway (docs/ray.md).

``RayModel`` implements the same protocol as a local model; each request goes to a replica
through Serve's ``DeploymentHandle`` (Serve picks the replica) and the replica batches it with
embedplex's own batcher (``embedplex/ray/replica.py``). What can go wrong is mapped here, once:

- a replica that dies (or cannot be reached) while it holds a request: the request is retried
  once (every operation is idempotent; Serve's router drops the dead replica, so the retry
  goes to another); if the retry fails too, the caller gets 503. Ray restarts the replica.
- Serve's own backpressure: 429; any other Ray failure: 503, its detail only in the log.
- an ``EmbedplexError`` the replica raised (a bad input, its queue timed out) reaches the
  caller as itself.
- an operation newer than the replicas (``wire.py``: a replica of an older release lacks the
  method): 422 naming the version, before any call, when the replicas said so; 503 when one
  replica of a rolling upgrade turns out to lack it (after one retry).

Every route that reaches a local model reaches a Ray one the same way: ``embed``, ``rerank``,
``tokenize``, ``embed_all`` and ``decode`` run in a replica (the model and its tokenizer live
there), each answering what the local model answers; the routes' own checks (input counts,
token bounds) run in the gateway for both.

Replica states are read from ``serve.status()`` every ``STATUS_INTERVAL_S`` (not per request):
readiness is false while no replica runs, and the status and metrics show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from embedplex.backends.tokenizer import Token
from embedplex.core.errors import (
    EmbedplexError,
    FatalBackendError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    UnavailableError,
)
from embedplex.core.types import (
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    RerankRequest,
    RerankResult,
    TokenEmbedResult,
)
from embedplex.models.config import RAY_MISSING, ModelConfig
from embedplex.ray.wire import (
    DEPLOYMENT,
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

if TYPE_CHECKING:
    from embedplex.config import Settings
    from embedplex.observability import Telemetry
    from embedplex.observability.ray_metrics import RayMetrics

logger = logging.getLogger(__name__)

STATUS_INTERVAL_S = 2.0  # how often replica states are read from Serve's controller
INFO_TIMEOUT_S = 120.0  # the first call to a new deployment (its batcher starts)
# How often replicas found too old for an operation are asked their version again (an upgrade).
VERSION_RECHECK_S = STATUS_INTERVAL_S
VERSION_PROBE_TIMEOUT_S = 10.0

# One Ray connection per process: the address the first ray model connected to.
_connected: list[str] = []
_connect_lock = threading.Lock()


class RayModel:
    """Replicas on Ray Serve behind one served name.

    ``errors``: the Ray exception classes to map, by what they mean (``ray_errors()``); a test
    passes its own. ``owned``: whether this gateway deployed the application (then it deletes
    it on close); one deployed with Ray's tooling is only used. ``wire``: the replicas' wire
    version (``wire.py``), as ``deploy`` read it.
    """

    def __init__(
        self,
        config: ModelConfig,
        handle: Any,  # a Serve DeploymentHandle: handle.embed.remote(request) (tests: a fake)
        info: ModelInfo,
        *,
        errors: RayErrors,
        owned: bool = False,
        read_states: Callable[[], dict[str, int]] | None = None,
        delete: Callable[[], None] | None = None,
        wire: int = WIRE_VERSION,
    ) -> None:
        self.config = config
        self.app = app_name(config.name)
        self._handle = handle
        self._info = info
        self._errors = errors
        self.owned = owned
        self._read_states = read_states
        self._delete = delete
        self._states: dict[str, int] = {"RUNNING": 1}  # deploy() returned: it is running
        self._status_error: str | None = None
        self._poller: asyncio.Task[None] | None = None
        self._metrics: RayMetrics | None = None
        self._active = 0
        self._per_replica: Counter[str] = Counter()
        self.retries = 0
        self.failures = 0
        self._limit = (config.max_concurrent_requests or 512) * _most_replicas(config)
        self.wire = wire
        self._wire_checked = time.monotonic()

    @classmethod
    def deploy(cls, settings: Settings, config: ModelConfig) -> RayModel:
        """Connect to Ray, deploy the model's application (or attach to a running one) and
        wait until it answers. Blocking: the gateway builds models in a thread."""
        try:
            import ray
            from ray import serve
        except ImportError as exc:
            raise FatalBackendError(f"model {config.name!r}: {RAY_MISSING}") from exc
        from embedplex.ray.application import application

        _connect(ray, config.ray_address or "auto")
        serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy on the cluster
        name = app_name(config.name)
        running = serve.status().applications.get(name)
        owned = running is None or str(_value(running.status)) != "RUNNING"
        if owned:
            logger.info("%s: deploying Ray Serve application %s", config.name, name)
            try:
                handle = serve.run(application(settings, config), name=name, route_prefix=None)
            except Exception as exc:  # Serve gives up after the constructor's retries
                raise FatalBackendError(
                    f"model {config.name!r}: Ray Serve could not deploy {name}: {exc}"
                ) from exc
        else:
            logger.info("%s: using the running Ray Serve application %s", config.name, name)
            handle = serve.get_app_handle(name)
        info: ModelInfo = handle.info.remote().result(timeout_s=INFO_TIMEOUT_S)
        wire = _wire_version(handle)
        if wire < WIRE_VERSION:
            logger.warning(
                "%s: the replicas of %s run an older embedplex (wire version %d, this gateway's "
                "is %d): %s are refused until it is redeployed",
                config.name,
                name,
                wire,
                WIRE_VERSION,
                ", ".join(sorted(m for m, v in SINCE.items() if v > wire)),
            )

        def read_states() -> dict[str, int]:
            app = serve.status().applications.get(name)
            deployment = app.deployments.get(DEPLOYMENT) if app is not None else None
            if deployment is None:
                return {}
            return {str(_value(k)): int(v) for k, v in deployment.replica_states.items()}

        def delete() -> None:
            serve.delete(name)

        return cls(
            config,
            handle,
            info,
            errors=ray_errors(),
            owned=owned,
            read_states=read_states,
            delete=delete,
            wire=wire,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def instrument(self, telemetry: Telemetry) -> None:
        self._metrics = telemetry.metrics.ray

    async def start(self) -> None:
        if self._read_states is not None:
            await self._poll_once()
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self, *, drain: bool = True) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.owned and self._delete is not None:
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
        assert self._read_states is not None
        try:
            states = await asyncio.to_thread(self._read_states)
        except Exception as exc:
            if self._status_error is None:
                logger.warning("%s: cannot read Ray Serve's status: %s", self.config.name, exc)
            self._status_error = type(exc).__name__
            return
        self._status_error = None
        self._states = states
        if self._metrics is not None:
            self._metrics.on_replicas(self.config.name, states)

    def health(self) -> None:
        if self._status_error is not None:
            raise NotReadyError(f"cannot read Ray Serve's status ({self._status_error})")
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
            "active_requests": self._active,
            "queued": 0,  # queues are in the replicas
            "in_flight_batches": 0,
            "batches": 0,
            "max_batch_requests": self._info.max_batch_requests or 0,
        }

    def admit(self) -> None:
        """The gateway's cap for this model: each replica's ``max_concurrent_requests`` times
        the most replicas it may have (each replica also admits on its own)."""
        if self._active >= self._limit:
            raise OverloadedError(
                f"{self._active} requests in flight to {self.config.name}'s Ray replicas "
                f"(at most {self._limit})"
            )

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        answer = typing.cast(EmbedAnswer, await self._call("embed", request))
        return EmbedResult(
            vectors=list(answer.matrix),
            prompt_tokens=answer.prompt_tokens,
            model=self._info.name,
            timings=answer.timings,
        )

    async def rerank(self, request: RerankRequest) -> RerankResult:
        answer = typing.cast(RerankAnswer, await self._call("rerank", request))
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
        call = TokenizeCall(texts, add_special_tokens, prompt_name)
        answer = await self._call("tokenize", call, admit=False)
        return typing.cast(TokensAnswer, answer).rows()

    async def embed_all(self, request: EmbedRequest) -> TokenEmbedResult:
        answer = typing.cast(TokenEmbedAnswer, await self._call("embed_all", request))
        return TokenEmbedResult(
            vectors=answer.vectors(),
            prompt_tokens=answer.prompt_tokens,
            model=self._info.name,
            timings=answer.timings,
        )

    async def decode(self, sequences: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        """TEI ``/decode`` in a replica; not admitted against the model's cap (as ``tokenize``)."""
        call = DecodeCall(sequences, skip_special_tokens)
        answer = await self._call("decode", call, admit=False)
        return typing.cast(DecodeAnswer, answer).texts

    async def _call(self, method: str, request: object, *, admit: bool = True) -> Answer:
        """``method`` of a replica; ``admit``: counted against (and refused beyond) the cap."""
        await self._check_version(method)
        if admit:
            self.admit()
            self._active += 1
        try:
            answer = await self._remote(method, request)
        finally:
            if admit:
                self._active -= 1
        if isinstance(answer, EmbedplexError):
            raise answer
        replica = typing.cast(Answer, answer).replica
        self._per_replica[replica] += 1
        if self._metrics is not None:
            self._metrics.on_answer(self.config.name, replica)
        return typing.cast(Answer, answer)

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

    async def _remote(self, method: str, request: object) -> object:
        name = self.config.name
        errors = self._errors
        for attempt in (1, 2):
            try:
                return await getattr(self._handle, method).remote(request)
            except errors.overloaded as exc:
                msg = f"{name}: Ray Serve refused the request (its queue is full)"
                raise OverloadedError(msg) from exc
            except errors.replica_lost as exc:
                lost: BaseException = exc
                why = f"replica lost ({type(exc).__name__})"
                failed = "its Ray replica failed while serving the request, and so did the retry"
            except errors.other as exc:
                if not _lacks(exc, method, errors):
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
            raise UnavailableError(f"model {name!r}: {failed}; retry later") from lost
        raise AssertionError("unreachable")

    def _retrying(self, why: str) -> None:
        self.retries += 1
        if self._metrics is not None:
            self._metrics.on_retry(self.config.name)
        logger.warning("%s: %s; retrying once", self.config.name, why)


class RayErrors(typing.NamedTuple):
    """Ray's exception classes by what they mean for a request.

    ``no_method``: the class of the error a replica raises for a method it does not have (the
    ``cause`` of the task error the caller gets, whose message names the method).
    """

    overloaded: tuple[type[BaseException], ...]
    replica_lost: tuple[type[BaseException], ...]
    other: tuple[type[BaseException], ...]
    no_method: type[BaseException] | None = None


def ray_errors() -> RayErrors:
    from ray.exceptions import ActorUnavailableError, RayActorError, RayError
    from ray.serve.exceptions import BackPressureError, RayServeException

    return RayErrors(
        overloaded=(BackPressureError,),
        replica_lost=(RayActorError, ActorUnavailableError),
        other=(RayError, RayServeException),
        no_method=RayServeException,
    )


def _lacks(exc: BaseException, method: str, errors: RayErrors) -> bool:
    """Whether ``exc`` says the replica has no ``method`` (Serve raises its base exception,
    not a subclass, naming the method in quotes)."""
    cause = getattr(exc, "cause", None)
    return (
        errors.no_method is not None
        and type(cause) is errors.no_method
        and f"'{method}'" in str(cause)
    )


def _wire_version(handle: Any) -> int:
    """The replicas' wire version (blocking; ``deploy``): 1 when they have no ``wire_version``,
    which replicas of the first release lack."""
    try:
        return int(handle.wire_version.remote().result(timeout_s=INFO_TIMEOUT_S))
    except Exception as exc:
        logger.info("no wire_version from the replicas (%s): version 1", type(exc).__name__)
        return 1


def _connect(ray: Any, address: str) -> None:
    """``ray.init`` once per process; a second model naming another cluster is refused. A
    process that is a Ray driver already (it called ``ray.init`` itself: an application that
    embeds the gateway, a test) uses the cluster it is connected to."""
    with _connect_lock:
        if _connected:
            if _connected[0] != address:
                raise FatalBackendError(
                    f"ray_address {address!r}: this gateway is already connected to "
                    f"{_connected[0]!r} (one Ray cluster per process)"
                )
            return
        if ray.is_initialized():
            logger.info("already connected to a Ray cluster: ray_address %r not used", address)
            _connected.append(address)
            return
        try:
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise FatalBackendError(
                f"cannot connect to the Ray cluster at {address!r}: {exc} (ray_address = "
                '"local" starts a private Ray in this process)'
            ) from exc
        _connected.append(address)


def _most_replicas(config: ModelConfig) -> int:
    if config.autoscaling is not None:
        return config.autoscaling.max_replicas
    return config.replicas or 1


def _value(state: object) -> object:
    """An enum's value (Serve's states are enums in some versions, strings in others)."""
    return getattr(state, "value", state)
