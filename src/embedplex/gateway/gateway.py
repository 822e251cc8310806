"""The gateway: the served models by name, their lifecycle, and readiness.

``async with Gateway(models) as gw`` starts every model and closes (draining) them on exit.
The HTTP layer only ever talks to a gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from embedplex.core.errors import (
    EmbedplexError,
    FatalBackendError,
    InvalidRequestError,
    ModelNotAllowedError,
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    shown,
)
from embedplex.core.tenant import ANONYMOUS, Tenant, current_tenant
from embedplex.core.types import EmbeddingService, ModelInfo, RerankService, ServedModel
from embedplex.gateway.allowed import AllowedModels

if TYPE_CHECKING:
    from embedplex.cache import EmbeddingCache
    from embedplex.providers.router import Router

logger = logging.getLogger(__name__)

# What probes say of a failed start (the reason is in the log, not in a public body).
_LOAD_FAILED = "failed to load (the reason is in the server log)"


class Gateway:
    """Served models by name; ``router`` (optional) holds the remote providers they may use.

    ``allowed``: the allowed lists; a model outside them is never added (``build.py`` does not
    even load it), so every lookup below sees only what clients may use.
    """

    def __init__(
        self,
        models: Sequence[ServedModel] = (),
        *,
        router: Router | None = None,
        allowed: AllowedModels | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.router = router
        # The local models' embedding cache and dedupe counts (one per process), if built.
        self.cache = cache
        self.allowed = allowed or AllowedModels()
        self._models: dict[str, ServedModel] = {}
        # What ``pick`` reads on every request, kept from add and remove rather than worked out
        # per call: each kind's models by name (config order), and the model of a kind that
        # any name gets (see ``pick``). A served model's kind never changes: a lazy model's
        # load checks its files against its configured kind.
        self._by_kind: dict[str, dict[str, ServedModel]] = {}
        self._stand_in: dict[str, ServedModel] = {}
        for model in models:
            self.add(model)
        self.started = False
        self.draining = False  # SIGTERM: readiness false and new API work refused (503)
        # SIGTERM's pre-stop delay (``shutdown_delay_s``): readiness false, work still served.
        self.stopping_soon = False
        # Why loading failed (eager models, in-process): readiness and liveness report it.
        self.load_error: str | None = None
        self._dead_since: dict[str, float] = {}

    def add(self, model: ServedModel) -> None:
        name = model.info.name
        if name in self._models:
            raise ValueError(f"two models are served as {name!r}")
        if not self.allowed.allows(name, model.info.kind):
            raise InvalidRequestError(
                f"model {name!r} is outside the allowed {model.info.kind} models", param="model"
            )
        self._models[name] = model
        self._index()

    def remove(self, name: str) -> ServedModel:
        """Stop serving ``name`` (admin API); the caller closes it if it owns resources."""
        model = self._models.pop(name)
        self._index()
        return model

    def _index(self) -> None:
        by_kind: dict[str, dict[str, ServedModel]] = {}
        for name, model in self._models.items():
            by_kind.setdefault(model.info.kind, {})[name] = model
        self._by_kind = by_kind
        self._stand_in = {
            kind: next(iter(fits.values()))
            for kind, fits in by_kind.items()
            if len(fits) == 1 and not self.allowed.restricted(kind)
        }

    async def start(self) -> None:
        if self.router is not None:
            await self.router.start()
        for model in self._models.values():
            await model.start()
        self.started = True

    async def close(self, *, drain: bool = True) -> None:
        self.draining = True
        await asyncio.gather(*(m.close(drain=drain) for m in self._models.values()))
        if self.router is not None:
            await self.router.close(drain=drain)
        if self.cache is not None:
            await self.cache.aclose()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def services(self) -> list[ServedModel]:
        """The served models themselves (instrumentation, admin)."""
        return list(self._models.values())

    @property
    def models(self) -> list[ModelInfo]:
        return [m.info for m in self._models.values()]

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a served model's name (not an ad-hoc route a request made)."""
        return name in self._models

    def model(self, name: str | None) -> EmbeddingService:
        """The embedding model a request names (see ``pick``)."""
        return typing.cast(EmbeddingService, self.pick(name, "embedding"))

    def reranker(self, name: str | None) -> RerankService:
        """The reranker a request names (see ``pick``)."""
        return typing.cast(RerankService, self.pick(name, "reranker"))

    def pick(self, name: str | None, kind: str) -> ServedModel:
        """The model of ``kind`` a request names, if the request's tenant may use it (403)."""
        model = self._pick(name, kind)
        tenant = current_tenant.get()
        if tenant.models and not tenant.allows(model.info.name):
            raise ModelNotAllowedError(
                f"API key {tenant.key_id} may not use model {model.info.name!r} "
                f"(allowed: {', '.join(tenant.models)})",
                param="model",
            )
        return model

    def _pick(self, name: str | None, kind: str) -> ServedModel:
        """The model of ``kind`` a request names.

        No name: the first served model of that kind (the order of the config). A name served
        as another kind: 400. An unknown name: 404 listing the names served, except that with
        exactly one model of that kind and no allowed list for it, any name (an SDK's default,
        say) gets that model, so clients written for another server work unchanged. With an
        allowed list, names must match: the list is a promise about what clients can reach.
        """
        fits = self._by_kind.get(kind)
        if fits is not None:
            if name is None:
                return next(iter(fits.values()))
            model = fits.get(name)
            if model is not None:
                return model
            stand_in = self._stand_in.get(kind)
            if stand_in is not None and name not in self._models:
                return stand_in
        self._refuse(name, kind)

    def _refuse(self, name: str | None, kind: str) -> NoReturn:
        """Why no model of ``kind`` answers to ``name`` (``pick``'s errors)."""
        if not self._models:
            raise NotReadyError("no model is loaded yet")
        if name is not None and name in self._models:
            other = self._models[name].info.kind
            raise InvalidRequestError(
                f"model {shown(name)} is {_a(other)} model, not {_a(kind)} model", param="model"
            )
        served = ", ".join(sorted(self._models)) or "none"
        fits = self._by_kind.get(kind)
        if not fits:
            raise ModelNotFoundError(
                f"no {kind} model is served here (served: {served})", param="model"
            )
        raise ModelNotFoundError(
            f"model {shown(name)} is not served here "
            f"({kind} models served: {', '.join(sorted(fits))})",
            param="model",
        )

    def admit_kind(self, kind: str, who: Callable[[], Tenant] = lambda: ANONYMOUS) -> None:
        """Refuse (OverloadedError) when every served model of ``kind`` would refuse a request
        of ``tenant`` now; else do nothing. The pipeline asks before reading a body (the model
        a request names is in it), so that a refusal under overload costs no parsing; a
        request that passes is admitted again by its model. A key refused by them all is
        noted by each as wanting room (``batching/admission.py``), so that keys past their
        fair share leave it some; one that passes is noted by the model it names."""
        models = self._by_kind.get(kind, {}).values()
        refused: EmbedplexError | None = None
        tenant: Tenant | None = None  # asked of ``who`` only for a model that admits
        for model in models:
            admit = getattr(model, "admit", None)
            if admit is None:
                return  # no admission of its own (remote): it may take the request
            if tenant is None:
                tenant = who()
            try:
                admit(tenant, note=False)
            except OverloadedError as exc:
                refused = exc
                continue
            return
        if refused is not None:
            assert tenant is not None  # a model refused it
            for model in models:
                with contextlib.suppress(OverloadedError):
                    model.admit(tenant)  # type: ignore[attr-defined]  # each has one (above)
            raise refused

    def get(self, name: str | None) -> ServedModel:
        """The model served as ``name`` whatever its kind (None: the first); 404 if none."""
        if not self._models:
            raise NotReadyError("no model is loaded yet")
        if name is None:
            return next(iter(self._models.values()))
        if name not in self._models:
            raise ModelNotFoundError(
                f"model {shown(name)} is not served here "
                f"(served: {', '.join(sorted(self._models))})",
                param="model",
            )
        return self._models[name]

    def service(
        self, name: str | None, providers: Sequence[str] = (), policy: str | None = None
    ) -> EmbeddingService:
        """The model a request names, or an ad-hoc route when it names providers itself."""
        if not providers and policy is None:
            return self.model(name)
        tenant = current_tenant.get()
        if tenant.models and providers:
            # An ad-hoc route reaches any provider: not for a key limited to some models.
            raise ModelNotAllowedError(
                f"API key {tenant.key_id} is limited to models {', '.join(tenant.models)}; "
                "naming providers is not allowed",
                param="providers",
            )
        from embedplex.providers.config import RouteConfig
        from embedplex.providers.router import RemoteModel

        if self.router is None:
            raise ModelNotFoundError("no remote providers are configured", param="providers")
        if not providers:
            model = self.model(name)
            if not isinstance(model, RemoteModel):
                raise ModelNotFoundError(
                    f"model {model.info.name!r} is local; policy needs providers", param="policy"
                )
            providers = model.route.providers
        route = RouteConfig.model_validate(
            {"model": name or providers[0], "providers": list(providers), "policy": policy or "any"}
        )
        return RemoteModel(self.router, route)

    def ready(self) -> tuple[bool, str]:
        """Ready when started, not draining and every model's backend is healthy."""
        if self.load_error is not None:
            # Not the reason itself: this goes to unauthenticated probes, and a load error may
            # name a path on disk. The log and serve's exit message carry it.
            return False, _LOAD_FAILED
        if not self.started:
            return False, "loading"
        if self.draining or self.stopping_soon:
            return False, "draining"
        for name, model in self._models.items():
            try:
                model.health()
            except EmbedplexError as exc:
                return False, f"{name}: {exc.message}"
        return True, "ready"

    def dead(self) -> tuple[str, float] | None:
        """Why the process cannot serve again and for how long (seconds), or None.

        Dead: a model's backend failed fatally (a dead backend, a hung forward pass, a batching
        loop that died) or loading failed. Only a restart helps, so liveness fails after a grace
        period (``probes.py``). A lazy model that failed to load is not counted: its config or
        files need fixing, and restarting would also stop the models that work. Time runs from
        when a probe first saw it, at most one probe period late.
        """
        now = time.monotonic()
        if self.load_error is not None:
            since = self._dead_since.setdefault("", now)
            return _LOAD_FAILED, now - since
        worst: tuple[str, float] | None = None
        for name, model in self._models.items():
            try:
                model.health()
            except FatalBackendError as exc:
                if not getattr(model, "loaded", True):
                    continue  # a lazy model's failed load (see above)
                died = getattr(model, "dead_since", None)  # when its batcher died, if known
                since = self._dead_since.setdefault(name, died if died is not None else now)
                if worst is None or now - since > worst[1]:
                    worst = (f"{name}: {exc.message}", now - since)
            except EmbedplexError:
                pass
        return worst

    def stats(self) -> dict[str, Any]:
        return {name: model.stats() for name, model in self._models.items()}

    def cache_stats(self) -> dict[str, Any] | None:
        """The embedding cache's state and each local model's counts (None: not built)."""
        return self.cache.stats() if self.cache is not None else None

    def provider_stats(self) -> dict[str, Any]:
        return self.router.stats() if self.router is not None else {}


def _a(kind: str) -> str:
    """The kind with its article ("an embedding", "a reranker")."""
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"
