"""Who a request is for: the tenant identity the pipeline's authentication yields.

The HTTP pipeline authenticates every request into a ``Tenant`` (``api/stages.py``); routes copy
it into the core request (``EmbedRequest.tenant``) and models hand it to their batcher, whose
items carry the key id and priority. So a queue that schedules fairly across tenants, or serves
interactive work before batch work, needs no change in the routes or the models.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, replace
from enum import StrEnum
from fnmatch import fnmatchcase


class Priority(StrEnum):
    """How urgently a request wants its answer (a queue may serve ``INTERACTIVE`` first)."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyLimits:
    """What one key may use (None: unlimited): requests and tokens per minute, requests at once."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None


NO_LIMITS = KeyLimits()


@dataclass(frozen=True, slots=True, kw_only=True)
class Tenant:
    """An authenticated caller.

    ``key_id`` names the API key that authenticated the request (``"static"`` for the server's
    ``--api-key``), never the key itself; ``None`` when the server asks for no key. ``models``:
    the served names (``*`` patterns) the key may use, empty for all. ``limits``: what it may
    use. ``weight``: its share when a fair queue divides the model between tenants.
    """

    key_id: str | None = None
    priority: Priority = Priority.INTERACTIVE
    models: tuple[str, ...] = ()
    limits: KeyLimits = NO_LIMITS
    weight: int = 1

    def allows(self, model: str) -> bool:
        """Whether this tenant may use the served model ``model`` (no patterns: every one)."""
        return not self.models or any(fnmatchcase(model, p) for p in self.models)


ANONYMOUS = Tenant()
"""The tenant of every request when no API key is configured (and of open paths)."""

STATIC_KEY = Tenant(key_id="static")
"""The tenant of a request that presented the server's static ``--api-key``."""

current_tenant: ContextVar[Tenant] = ContextVar("embedplex_tenant", default=ANONYMOUS)
"""The tenant of the request being served, for the one place that resolves a served model
(``Gateway.pick``) to check ``Tenant.allows`` on every route. The authentication stage sets it
for every request when managed keys are on (``api/stages.py``)."""

_RANK = {Priority.BATCH: 0, Priority.INTERACTIVE: 1}


def lowered(tenant: Tenant, requested: Priority | None) -> Tenant:
    """``tenant`` at the priority a request asked for, which may lower its key's, never raise
    it: asking ``interactive`` with a ``batch`` key keeps ``batch`` (docs/scheduling.md)."""
    if requested is None or _RANK[requested] >= _RANK[tenant.priority]:
        return tenant
    return replace(tenant, priority=requested)
