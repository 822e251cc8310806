"""A model served with ``load = "lazy"``: loaded on the first request that names it.

Every model route reaches it as it reaches the model it stands in for (embed, rerank,
``/tokenize``, ``/embed_all``, ``/decode``): each waits for the load, then forwards.

Until then it answers ``info`` from its config, so that it is listed and routed by kind. The
first request starts one load (in a thread, at the inference threads' priority) and every
request that arrives meanwhile waits for the same load; a caller that leaves does not cancel it.
The callers waiting count against the model's ``max_concurrent_requests`` as requests in flight
(429 at once past it, or past a key's fair share: ``batching/admission.py``), and each waits at
most the model's queue timeout (then 503 ``queue_timeout``, with ``Retry-After``), so that
requests cannot pile onto a loading model without bound (each holds its body meanwhile).
A failed load does not make the replica unready (its other models serve, and a transient cause,
a hub outage, would otherwise keep the pod out of rotation for good): the model's own requests
get 503 naming the reason, and a request after a backoff (``RETRY_S``, doubling up to
``RETRY_MAX_S``) tries the load again. The reason never goes in the unauthenticated readiness
body (it may name a path on disk); ``/api/v1/status`` (admin) shows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from embedplex.backends.tokenizer import Token
from embedplex.batching import Slots
from embedplex.core.deadline import within
from embedplex.core.errors import FatalBackendError, NotReadyError, QueueTimeoutError
from embedplex.core.tenant import ANONYMOUS, Tenant, current_tenant
from embedplex.core.types import (
    Decoding,
    EmbeddingService,
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    RerankRequest,
    RerankResult,
    RerankService,
    ServedModel,
    TokenEmbedding,
    TokenEmbedResult,
    Tokenizing,
    no_token_embeddings,
    no_tokenizer,
)
from embedplex.observability.logs import log_failure
from embedplex.serve.process_tuning import run_lowered

if TYPE_CHECKING:
    from embedplex.observability import Telemetry

logger = logging.getLogger(__name__)

# First wait before a failed load is tried again, and the longest (it doubles per failure):
# long enough that a broken config is not reloaded per request, short enough that a transient
# failure heals by itself.
RETRY_S = 30.0
RETRY_MAX_S = 600.0


class LazyModel:
    """Stands in for a local model until its first request; then forwards to it."""

    def __init__(
        self,
        placeholder: ModelInfo,
        load: Callable[[], ServedModel],
        *,
        nice: int = 0,
        retry_s: float = RETRY_S,
        retry_max_s: float = RETRY_MAX_S,
        wait_s: float = 30.0,
    ) -> None:
        """``wait_s``: the longest a request waits for the load (the model's
        ``queue_timeout_ms``); the waiters are capped by the placeholder's
        ``max_concurrent_requests``."""
        self._placeholder = placeholder
        self._load = load
        self._nice = nice
        self._model: ServedModel | None = None
        self._loading: asyncio.Task[ServedModel] | None = None
        self._failed: str | None = None
        self._retry_s = retry_s
        self._retry_max_s = retry_max_s
        self._retry_at = 0.0  # monotonic time from which a failed load may be tried again
        self._telemetry: Telemetry | None = None
        self._closed = False
        name = placeholder.name
        cap = placeholder.max_concurrent_requests or 512  # the settings' default
        self._waiting = Slots(
            cap,
            full=lambda n: (
                f"{n} requests waiting for model {name!r} to load "
                f"(max_concurrent_requests is {cap})"
            ),
            what=f"requests waiting for model {name!r} to load",
        )
        self._wait_s = wait_s

    @property
    def info(self) -> ModelInfo:
        return self._model.info if self._model is not None else self._placeholder

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def instrument(self, telemetry: Telemetry) -> None:
        """Kept for the model once loaded (it must be instrumented before it starts)."""
        self._telemetry = telemetry

    async def start(self) -> None:
        """Nothing to start before the first request."""

    async def close(self, *, drain: bool = True) -> None:
        self._closed = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        if self._model is not None:
            await self._model.close(drain=drain)

    @property
    def dead_since(self) -> float | None:
        """The loaded model's (see ``Gateway.dead``); None before it loads."""
        return getattr(self._model, "dead_since", None)

    def health(self) -> None:
        # A failed load is this model's alone (its requests say why): not the replica's health.
        if self._model is not None:
            self._model.health()

    def stats(self) -> dict[str, Any]:
        if self._model is not None:
            return {**self._model.stats(), "load": "lazy", "loaded": True}
        return {
            "kind": self._placeholder.kind,
            "load": "lazy",
            "loaded": False,
            "failed": self._failed,
            "retry_in_s": self._retry_in() if self._failed is not None else None,
            "active_requests": self._waiting.total,  # the callers waiting for the load
            "queued": 0,
            "in_flight_batches": 0,
            "batches": 0,
            "max_batch_requests": self._placeholder.max_batch_requests or 0,
        }

    async def ready(self, tenant: Tenant | None = None) -> ServedModel:
        """The loaded model; the first caller starts the load and every caller waits for it,
        each as a request in flight of ``tenant`` (default: the request's, ``current_tenant``),
        for at most ``wait_s``."""
        if self._model is not None:
            return self._model
        if self._failed is not None and self._loading is None and self._retry_in() > 0:
            raise NotReadyError(
                f"model {self._placeholder.name!r} failed to load: {self._failed} "
                f"(tried again in {self._retry_in():.0f} s)"
            )
        if self._closed:
            raise NotReadyError("the server is shutting down")
        if tenant is None:
            tenant = current_tenant.get()
        self._waiting.take(tenant)  # 429 at once past the cap, or the key's share
        try:
            if self._loading is None:
                self._loading = asyncio.get_running_loop().create_task(self._load_once())
            return await self._wait(self._loading)
        finally:
            self._waiting.release(tenant)

    async def _wait(self, loading: asyncio.Task[ServedModel]) -> ServedModel:
        """``loading``'s model, within ``wait_s``; the load goes on whoever stops waiting
        (shielded: a caller that leaves, or times out, must not cancel the shared load)."""
        return await within(
            asyncio.shield(loading),
            self._wait_s,
            lambda: QueueTimeoutError(
                f"model {self._placeholder.name!r} is still loading after {self._wait_s:g}s "
                "(queue_timeout_ms); retry shortly",
                retry_after=1,
            ),
        )

    def _retry_in(self) -> float:
        return max(0.0, self._retry_at - time.monotonic())

    def _failed_now(self, reason: str) -> None:
        """Refuse for the backoff, then let a request try again; the next wait doubles."""
        self._failed = reason
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(self._retry_s * 2, self._retry_max_s)
        self._loading = None

    async def _load_once(self) -> ServedModel:
        name = self._placeholder.name
        logger.info("loading lazy model %s", name)
        model: ServedModel | None = None
        try:
            model = await run_lowered(self._load, self._nice)
            if self._telemetry is not None:
                self._telemetry.instrument([model])
            await model.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if model is not None:  # loaded, then failed to start: its pools and threads go
                await _close_quietly(model)
            reason = exc.message if isinstance(exc, FatalBackendError) else str(exc)
            self._failed_now(reason or type(exc).__name__)
            log_failure(
                logger,
                exc,
                "lazy model %s failed to load (tried again in %.0f s)",
                name,
                self._retry_in(),
            )
            raise NotReadyError(f"model {name!r} failed to load: {self._failed}") from exc
        if self._closed:
            await model.close(drain=False)
            raise NotReadyError("the server is shutting down")
        self._model = model
        self._failed = None
        logger.info("lazy model %s loaded", name)
        return model

    def admit(self, tenant: Tenant = ANONYMOUS, *, note: bool = True) -> None:
        """Refuse at once when the loaded model would; before it loads, when its waiters
        would (``ready``)."""
        if self._model is None:
            self._waiting.check(tenant, note=note)
            return
        admit = getattr(self._model, "admit", None)
        if admit is not None:
            admit(tenant, note=note)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        model = await self.ready(request.tenant)  # its own embed admits (or refuses) it then
        # The load checked the files' kind against the configured one, so the cast holds.
        return await typing.cast(EmbeddingService, model).embed(request)

    async def rerank(self, request: RerankRequest) -> RerankResult:
        model = await self.ready(request.tenant)
        return await typing.cast(RerankService, model).rerank(request)

    async def tokenize(
        self, texts: list[str], *, add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        model = await self.ready()
        if not isinstance(model, Tokenizing):
            raise no_tokenizer(self.info.name)
        return await model.tokenize(
            texts, add_special_tokens=add_special_tokens, prompt_name=prompt_name
        )

    async def embed_all(self, request: EmbedRequest) -> TokenEmbedResult:
        """``/embed_all`` once loaded (what the route says of a model that cannot)."""
        model = await self.ready(request.tenant)
        if not isinstance(model, TokenEmbedding):
            raise no_token_embeddings(self.info.name)
        return await model.embed_all(request)

    async def decode(self, sequences: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        """``/decode`` once loaded."""
        model = await self.ready()
        if not isinstance(model, Decoding):
            raise no_tokenizer(self.info.name)
        return await model.decode(sequences, skip_special_tokens=skip_special_tokens)


async def _close_quietly(model: ServedModel) -> None:
    """Close a model that failed to start (each retry would otherwise leave one behind)."""
    try:
        await model.close(drain=False)
    except Exception:
        logger.exception("closing lazy model %s after its failed start", model.info.name)
