"""Providers added at run time, kept in the store and applied on every replica.

The admin API (``api/routes/admin.py``) writes each added or removed provider here (with the
change counter moved), and every replica's ``ProviderSync.apply`` runs when it sees the counter
move (``cache.py``'s poller): it adds the stored providers its router lacks and removes the
ones it added that are gone from the store. Providers from the config file are never touched,
and a stored provider whose name a replica's config already uses is left to the config there.
The stored config holds no secret: only the names of the variables that hold provider keys.

Replicas of two versions share the store during a rolling upgrade. So a provider is stored with
the fields that differ from their defaults only (a field a newer version adds is not written
unless set), and a stored field this version does not know is dropped with a warning, not a
refusal of every stored provider.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from embedplex.providers.config import ProviderConfig
from embedplex.state import schema
from embedplex.state.store import StateStore, bump, now

if TYPE_CHECKING:
    from embedplex.gateway import Gateway

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


class ProviderSync:
    """Applies the stored providers to one replica's router and gateway."""

    def __init__(self, providers: ProviderStore, telemetry: Any) -> None:
        self.providers = providers
        self.telemetry = telemetry
        self.applied: set[str] = set()  # names this replica took from the store

    def adopt(self, name: str) -> None:
        """A provider this replica added itself through the admin API (already applied)."""
        self.applied.add(name)

    def forget(self, name: str) -> None:
        self.applied.discard(name)

    async def apply(self, gw: Gateway) -> None:
        from embedplex.providers.config import RouteConfig
        from embedplex.providers.router import RemoteModel, RemoteRoute

        router = gw.router
        if router is None or not gw.started:
            return
        stored = await self.providers.all()
        served = {m.name for m in gw.models}
        for name, (config, serve_as) in stored.items():
            if name in router.runtimes:
                continue
            await router.add(config)
            self.applied.add(name)
            if serve_as is not None and serve_as not in served:
                model = RemoteModel(router, RouteConfig(model=serve_as, providers=[name]))
                self.telemetry.instrument([model])
                await model.start()
                gw.add(model)
            logger.info("provider %s added from the state store", name)
        for name in sorted(self.applied - set(stored)):
            self.applied.discard(name)
            if name not in router.runtimes:
                continue
            await router.remove(name)
            for m in gw.services():
                if isinstance(m, RemoteRoute) and m.route.providers == [name]:
                    gw.remove(m.info.name)
            logger.info("provider %s removed (gone from the state store)", name)
