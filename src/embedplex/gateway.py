"""The gateway: the served models by name, their lifecycle, and readiness.

``async with Gateway(models) as gw`` starts every model and closes (draining) them on exit.
The HTTP layer only ever talks to a gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from embedplex.errors import EmbedplexError, ModelNotFoundError, NotReadyError
from embedplex.service import EmbeddingService, ModelInfo

logger = logging.getLogger(__name__)


class Gateway:
    def __init__(self, models: Sequence[EmbeddingService] = ()) -> None:
        self._models: dict[str, EmbeddingService] = {}
        for model in models:
            self.add(model)
        self.started = False
        self.draining = False

    def add(self, model: EmbeddingService) -> None:
        name = model.info.name
        if name in self._models:
            raise ValueError(f"two models are served as {name!r}")
        self._models[name] = model

    async def start(self) -> None:
        for model in self._models.values():
            await model.start()
        self.started = True

    async def close(self, *, drain: bool = True) -> None:
        self.draining = True
        await asyncio.gather(*(m.close(drain=drain) for m in self._models.values()))

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def services(self) -> list[EmbeddingService]:
        """The served models themselves (for instrumentation)."""
        return list(self._models.values())

    @property
    def models(self) -> list[ModelInfo]:
        return [m.info for m in self._models.values()]

    def model(self, name: str | None) -> EmbeddingService:
        """The model a request names.

        With one model served, any name (an SDK's default, say) gets it: clients written for
        another server work unchanged. With several, the name must match.
        """
        if not self._models:
            raise NotReadyError("no model is loaded yet")
        if name is not None and name in self._models:
            return self._models[name]
        if len(self._models) == 1:
            return next(iter(self._models.values()))
        known = ", ".join(sorted(self._models))
        raise ModelNotFoundError(
            f"model {name!r} is not served here (served: {known})", param="model"
        )

    def ready(self) -> tuple[bool, str]:
        """Ready when started, not draining and every model's backend is healthy."""
        if not self.started:
            return False, "loading"
        if self.draining:
            return False, "draining"
        for name, model in self._models.items():
            try:
                model.health()
            except EmbedplexError as exc:
                return False, f"{name}: {exc.message}"
        return True, "ready"

    def stats(self) -> dict[str, Any]:
        return {name: model.stats() for name, model in self._models.items()}
