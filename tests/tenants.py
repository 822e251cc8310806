"""Tenants for tests, before managed keys exist: a stage that picks one by a request header."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from embedplex.api.pipeline import Exchange, Pipeline
from embedplex.backends.fake import FakeBackend
from embedplex.core.tenant import KeyLimits, Tenant
from helpers import fake_app


class TenantByHeader:
    """A test's authentication: ``x-test-tenant: <key id>`` picks one of ``tenants``."""

    def __init__(self, tenants: dict[str, Tenant]) -> None:
        self.tenants = tenants

    def enter(self, ex: Exchange) -> None:
        name = ex.header(b"x-test-tenant")
        if name is not None:
            ex.tenant = self.tenants[name.decode()]


def limited_app(
    model_dir: Path,
    backend: FakeBackend,
    limits: dict[str, KeyLimits],
    **settings: object,
) -> FastAPI:
    """The fake-backed app with ``TenantByHeader`` where authentication is (after the request
    id and body limit), so the real ``RateLimit`` stage sees the tenants it sets."""
    app = fake_app(model_dir, backend, **settings)
    tenants = {key: Tenant(key_id=key, limits=lim) for key, lim in limits.items()}
    pipeline = app.edge
    assert isinstance(pipeline, Pipeline)
    pipeline.stages.insert(2, TenantByHeader(tenants))
    return app
