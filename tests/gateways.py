"""Gateway processes sharing one state store, for the scale-out tests.

Each is a real ``embedplex serve`` on its own 127.0.0.1 port, serving a remote route to a fake
upstream (no model to load, so they start fast), with the admin API on and the fake upstream's
loopback network allowed for providers added at run time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from embedplex.cli.providers import toml_block
from embedplex.config import Settings
from embedplex.providers.config import RouteConfig
from helpers import free_port, stop, wait_ready
from upstream_fakes import FakeUpstream, provider

ROOT = Path(__file__).parents[1]
ADMIN_SECRET = "gateways-admin-secret"
ADMIN = {"authorization": f"Bearer {ADMIN_SECRET}"}
PROPAGATION_S = 5.0  # the documented bound (docs/keys.md)


def gateway_settings(state_url: str, upstream: FakeUpstream, **kw: Any) -> Settings:
    """An in-process gateway's settings, as the spawned ones': ``remote`` routed to
    ``upstream``, the admin API on, loopback allowed for run-time providers; a fast poll."""
    return Settings(
        local_model=False,
        state_url=state_url,
        state_poll_s=0.2,
        admin_secret=ADMIN_SECRET,
        provider_allowed_networks=["127.0.0.0/8"],
        providers=[provider("up", upstream)],
        routes=[RouteConfig(model="remote", providers=["up"])],
        **kw,
    )


def spawn(config: Path, port: int, state_url: str, **extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    env.update(extra)
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        EMBEDPLEX_STATE_URL=state_url,
        EMBEDPLEX_ADMIN_SECRET=ADMIN_SECRET,
        # The fake upstream listens on loopback: the operator allows it for run-time providers.
        EMBEDPLEX_PROVIDER_ALLOWED_NETWORKS='["127.0.0.0/8"]',
    )
    return subprocess.Popen(
        [sys.executable, "-m", "embedplex", "serve", "--config", str(config), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextmanager
def gateways(
    tmp_path: Path, state_url: str, upstream: FakeUpstream, **extra: str
) -> Iterator[tuple[str, str]]:
    """Two gateways on one store (and ``extra`` environment) serving ``remote`` via
    ``upstream``; yields their base URLs, stops both (SIGTERM, then kill) on exit."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        "local_model = false\n"
        + toml_block(provider("up", upstream))
        + '\n[[routes]]\nmodel = "remote"\nproviders = ["up"]\n'
    )
    ports = free_port(), free_port()
    procs = [spawn(config, port, state_url, **extra) for port in ports]
    bases = tuple(f"http://127.0.0.1:{port}" for port in ports)
    try:
        for proc, base in zip(procs, bases, strict=True):
            wait_ready(proc, base, timeout=90)
        yield bases[0], bases[1]
    finally:
        stop(*procs)


def embed(base: str, key: str, model: str = "remote", text: str = "hello") -> int:
    r = httpx.post(
        base + "/v1/embeddings",
        json={"input": text, "model": model},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    return r.status_code


def models(base: str, key: str) -> set[str]:
    r = httpx.get(base + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"]}


def create_key(base: str, name: str, **limits: int) -> str:
    r = httpx.post(base + "/api/v1/keys", json={"name": name, **limits}, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


def seconds_until(check: Callable[[], object], limit: float = 15.0) -> float:
    """How long until ``check()`` holds (polled every 0.1 s); fails past ``limit``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise AssertionError("never happened")
        time.sleep(0.1)
    return time.monotonic() - start
