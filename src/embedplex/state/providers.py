"""Providers added at run time, kept in the store and applied on every replica.

The admin API (``api/routes/admin.py``) writes each added or removed provider here (with the
change counter moved) before it changes its own router, and every replica's
``ProviderSync.apply`` runs when it sees the counter move (``cache.py``'s poller): it adds the
stored providers its router lacks, replaces those it took from the store whose stored config or
served name has changed since (a provider removed and added again with a new endpoint within
one poll), and removes the ones it added that are gone from the store. Providers from the
config file are never touched, and a stored provider whose name a replica's config already uses
is left to the config there. The stored config holds no provider key of its own, only the
names of the variables that hold them; an endpoint's query string is stored as written (a
``?key=`` in it too: docs/keys.md says to use ``api_key_env`` for run-time providers).

Replicas of two versions share the store during a rolling upgrade. So a provider is stored with
the fields that differ from their defaults only (a field a newer version adds is not written
unless set), and a stored field this version does not know is dropped with a warning, not a
refusal of every stored provider.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from embedplex.providers.config import ProviderConfig
from embedplex.state import schema
from embedplex.state.store import StateStore, bump, now

if TYPE_CHECKING:
    from embedplex.gateway import Gateway
    from embedplex.providers.runtime import ProviderRuntime

logger = logging.getLogger(__name__)


class ProviderStore:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def put(self, config: ProviderConfig, serve_as: str | None) -> None:
        table = schema.providers
        async with self.store.engine.begin() as conn:
            await conn.execute(delete(table).where(table.c.name == config.name))
            await conn.execute(
                table.insert().values(
                    name=config.name,
                    config=config.model_dump(mode="json", exclude_defaults=True),
                    serve_as=serve_as,
                    updated_at=now(),
                )
            )
            await bump(conn)

    async def delete(self, name: str) -> None:
        table = schema.providers
        async with self.store.engine.begin() as conn:
            result = await conn.execute(delete(table).where(table.c.name == name))
            if result.rowcount:
                await bump(conn)

    async def all(self) -> dict[str, tuple[ProviderConfig, str | None]]:
        table = schema.providers
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(select(table).order_by(table.c.name))
            return {r.name: (_known(r.name, r.config), r.serve_as) for r in rows}


def _known(name: str, stored: dict[str, Any]) -> ProviderConfig:
    """A stored config, less the fields this version does not know (written by a newer one)."""
    unknown = sorted(set(stored) - set(ProviderConfig.model_fields))
    if unknown:
        logger.warning(
            "stored provider %r: fields %s are not known to this version; ignored",
            name,
            ", ".join(unknown),
        )
    return ProviderConfig.model_validate({k: v for k, v in stored.items() if k not in unknown})


# A provider as a replica applied it: its stored config (as JSON) and served name.
_Shape = tuple[dict[str, Any], str | None]


def _shape(config: ProviderConfig, serve_as: str | None) -> _Shape:
    return config.model_dump(mode="json"), serve_as


class ProviderSync:
    """Applies the stored providers to one replica's router and gateway.

    It also owns putting a provider into a gateway and taking it out, for the admin API too,
    and a lock that makes each change (an admin request, an ``apply``) whole: the poller never
    sees a provider the admin API has stored but not yet started, nor the reverse.
    """

    def __init__(self, providers: ProviderStore, telemetry: Any) -> None:
        self.providers = providers
        self.telemetry = telemetry
        # Providers this replica took from the store or stored itself, as applied: a stored
        # provider whose config or served name differs (removed and added again elsewhere,
        # within one poll) is replaced, not left as the old one because the name is known.
        self.applied: dict[str, _Shape] = {}
        self.lock = asyncio.Lock()
        self._draining: set[asyncio.Task[None]] = set()

    def adopt(self, name: str, config: ProviderConfig, serve_as: str | None) -> None:
        """A provider this replica stored and added itself through the admin API."""
        self.applied[name] = _shape(config, serve_as)

    def forget(self, name: str) -> None:
        self.applied.pop(name, None)

    async def put_in(self, gw: Gateway, config: ProviderConfig, serve_as: str | None) -> None:
        """Start the provider and serve it as ``serve_as`` (if any), replacing the provider of
        that name (and the models that serve it alone) if there is one. Everything new is
        started first and swapped in in one step, so its model never answers 404 meanwhile;
        the old runtime drains in the background. On a failure nothing changed."""
        from embedplex.providers.config import RouteConfig
        from embedplex.providers.router import RemoteModel

        router = gw.router
        assert router is not None
        runtime = await router.start_runtime(config)
        model = None
        if serve_as is not None:
            model = RemoteModel(router, RouteConfig(model=serve_as, providers=[config.name]))
            self.telemetry.instrument([model])  # as every served model
        # From here to the end no await yields: requests see the old provider or the new one.
        old = router.swap(runtime)
        try:
            if model is not None:
                await model.start()  # its check: the provider it routes to is there
            olds = self._alone(gw, config.name)
            for m in olds:
                gw.remove(m.info.name)
            try:
                if model is not None:
                    gw.add(model)
            except BaseException:
                for m in olds:
                    gw.add(m)
                raise
        except BaseException:
            if old is None:
                router.take(config.name)
            else:
                router.swap(old)
            self._drain(runtime)
            raise
        if old is not None:
            self._drain(old)

    def take_out(self, gw: Gateway, name: str) -> None:
        """Stop routing to the provider and serving the models that serve it alone; its
        requests in flight finish in the background (``close`` waits for them)."""
        assert gw.router is not None
        self._drain(gw.router.take(name))
        for m in self._alone(gw, name):
            gw.remove(m.info.name)

    @staticmethod
    def _alone(gw: Gateway, name: str) -> list[Any]:
        from embedplex.providers.router import RemoteRoute

        return [
            m for m in gw.services() if isinstance(m, RemoteRoute) and m.route.providers == [name]
        ]

    def _drain(self, runtime: ProviderRuntime) -> None:
        """Close ``runtime`` once its requests in flight are done, outside the lock and the
        poller: a drain lasts up to the provider's retry budget."""
        task = asyncio.get_running_loop().create_task(
            runtime.close(drain=True), name=f"provider-drain:{runtime.name}"
        )
        self._draining.add(task)
        task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        self._draining.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("closing a replaced provider failed", exc_info=task.exception())

    async def close(self) -> None:
        """Wait for the replaced and removed providers' drains (shutdown)."""
        while self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)

    async def apply(self, gw: Gateway) -> None:
        router = gw.router
        if router is None or not gw.started:
            return
        async with self.lock:
            stored = await self.providers.store.bounded(self.providers.all())
            for name, (config, serve_as) in stored.items():
                wanted = _shape(config, serve_as)
                replacing = name in router.runtimes
                # In the router and not applied from the store: the config file's (left to
                # it); applied as stored already: nothing to do.
                if replacing and self.applied.get(name, wanted) == wanted:
                    continue
                try:
                    # Served names in use, less those the replaced provider's models hold.
                    served = {m.name for m in gw.models} - {
                        m.info.name for m in self._alone(gw, name) if replacing
                    }
                    await self.put_in(gw, config, serve_as if serve_as not in served else None)
                except Exception:
                    logger.exception("applying stored provider %s failed", name)
                    continue
                self.applied[name] = wanted
                if replacing:
                    logger.info("provider %s replaced (changed in the state store)", name)
                else:
                    logger.info("provider %s added from the state store", name)
            for name in sorted(set(self.applied) - set(stored)):
                del self.applied[name]
                if name in router.runtimes:
                    self.take_out(gw, name)
                    logger.info("provider %s removed (gone from the state store)", name)
