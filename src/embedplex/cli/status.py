"""``embedplex status`` and ``embedplex health``: read a running server, print rich tables.

Both speak HTTP to the server (``/api/v1/status``, ``/health/live``, ``/health/ready``); with
``--json`` they print the raw document for scripts.
"""

from __future__ import annotations

from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from embedplex.cli.server_errors import error_message


class StatusRefused(Exception):
    """The server answered /api/v1/status with an error; the text is its own message."""


# What a refusal of the admin route means for whoever ran the command.
_REFUSAL_HINTS = {
    401: "pass the server's admin secret with --admin-secret or EMBEDPLEX_ADMIN_SECRET",
}


def fetch_status(
    url: str, *, admin_secret: str | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """GET /api/v1/status (an admin route); raises ``httpx.HTTPError`` when unreachable and
    ``StatusRefused`` with the server's own message when refused (403: the server has no admin
    secret; 401: a missing or wrong one)."""
    headers = {"authorization": f"Bearer {admin_secret}"} if admin_secret else {}
    r = httpx.get(url.rstrip("/") + "/api/v1/status", headers=headers, timeout=timeout)
    if r.status_code >= 400:
        hint = _REFUSAL_HINTS.get(r.status_code)
        raise StatusRefused(f"{r.status_code}: {error_message(r)}" + (f" ({hint})" if hint else ""))
    payload: dict[str, Any] = r.json()
    return payload


def fetch_health(url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """Liveness and readiness; ``live`` is False when the server cannot be reached."""
    base = url.rstrip("/")
    try:
        live = httpx.get(base + "/health/live", timeout=timeout)
        ready = httpx.get(base + "/health/ready", timeout=timeout)
    except httpx.HTTPError as exc:
        return {"url": base, "live": False, "ready": False, "status": f"unreachable: {exc}"}
    reason = ready.json().get("status", "") if ready.content else ""
    return {
        "url": base,
        "live": live.status_code == 200,
        "ready": ready.status_code == 200,
        "status": reason,
    }


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "-"


def render_status(payload: dict[str, Any], console: Console, url: str = "") -> None:
    state = "[green]ready[/]" if payload.get("ready") else f"[red]{payload.get('status')}[/]"
    console.print(
        f"embedplex {payload.get('version', '?')} at {url or 'server'}: {state}, "
        f"up {_duration(float(payload.get('uptime_s', 0)))}"
    )
    table = Table(title="Models", title_justify="left")
    table.add_column("model", no_wrap=True)
    for column in ("queued", "running", "max batch", "inputs/s", "tokens/s", "batches"):
        table.add_column(column, justify="right")
    table.add_column("batch mean/max", justify="right")
    table.add_column("errors")
    for name, m in payload.get("models", {}).items():
        recent = m.get("recent", {})
        table.add_row(
            f"{name}\n[dim]{m.get('backend')} {m.get('device')} {m.get('dtype')}[/]",
            str(m.get("queued", "-")),
            f"{m.get('active_requests', '-')} req / {m.get('in_flight_batches', '-')} bat",
            str(m.get("max_batch_requests", "-")),
            f"{recent.get('inputs_per_s', 0):.1f}",
            f"{recent.get('tokens_per_s', 0):.1f}",
            str(recent.get("batches", 0)),
            f"{recent.get('mean_batch_size', 0):.1f} / {recent.get('max_batch_size', 0)}",
            _errors(m.get("errors", {})),
        )
    console.print(table)
    models: dict[str, Any] = payload.get("models", {})
    window = next((m.get("recent", {}).get("window_s") for m in models.values()), None)
    if window:
        console.print(f"rates over the last {window:g}s")
    replicated = {n: m for n, m in models.items() if m.get("runtime") == "ray"}
    if replicated:
        console.print(_ray_table(replicated))
    providers: dict[str, Any] = payload.get("providers") or {}
    if providers:
        console.print(_providers_table(providers))
    cache: dict[str, Any] = payload.get("cache") or {}
    if cache:
        console.print(_cache_table(cache))
    # Sections added by other parts render as generic tables.
    for section, rows in payload.items():
        if section not in ("models", "providers", "cache") and isinstance(rows, dict) and rows:
            console.print(_generic_table(section, rows))


def _providers_table(providers: dict[str, Any]) -> Table:
    """Remote providers: circuit, adaptive batch size, queues and upstream call counts."""
    table = Table(title="Providers", title_justify="left")
    table.add_column("provider")
    table.add_column("circuit")
    for column in ("batch size", "queued", "in flight", "lanes", "calls", "texts", "texts/call"):
        table.add_column(column, justify="right")
    table.add_column("success, p50/p99")
    for name, p in providers.items():
        health = p.get("health", {})
        counters = p.get("counters", {})
        calls = counters.get("upstream_calls", 0)
        texts = counters.get("texts", 0)
        circuit = str(health.get("circuit", "-"))
        colour = {"closed": "green", "open": "red"}.get(circuit, "yellow")
        table.add_row(
            f"{name}\n[dim]{p.get('type')} {p.get('endpoint')}[/]",
            f"[{colour}]{circuit}[/]",
            str(p.get("aimd", {}).get("batch_size", "-")),
            str(p.get("queued", "-")),
            str(p.get("in_flight_batches", "-")),
            str(len(p.get("lanes", []))),
            str(calls),
            str(texts),
            f"{texts / calls:.1f}" if calls else "-",
            f"{health.get('success_rate', 0):.0%}, "
            f"{health.get('latency_p50_ms', 0):.0f}/{health.get('latency_p99_ms', 0):.0f} ms",
        )
    return table


def _ray_table(models: dict[str, Any]) -> Table:
    """Models served by Ray Serve replicas: replica states and who answered what."""
    table = Table(title="Ray Serve replicas", title_justify="left")
    table.add_column("model")
    table.add_column("replicas")
    table.add_column("requests per replica")
    for column in ("retried", "failed"):
        table.add_column(column, justify="right")
    for name, m in models.items():
        states = m.get("replicas", {})
        per_replica = m.get("requests_per_replica", {})
        table.add_row(
            f"{name}\n[dim]{m.get('app')}[/]",
            ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items())) or "none",
            ", ".join(f"{k} {v}" for k, v in sorted(per_replica.items())) or "-",
            str(m.get("retries", 0)),
            str(m.get("replica_failures", 0)),
        )
    return table


def _cache_table(cache: dict[str, Any]) -> Table:
    """The embedding cache: its fill in the title, then each model's hits, refused Redis values
    (another shape or out of range: each also a miss), misses and joins."""
    shared = cache.get("(all models)", {})
    mib = 1024 * 1024
    state = (
        f"{shared.get('bytes', 0) / mib:.1f} of {shared.get('max_bytes', 0) / mib:.0f} MiB, "
        f"{shared.get('entries', 0)} entries, {shared.get('evictions', 0)} evicted, "
        f"redis {shared.get('redis', 'off')}"
        if shared.get("enabled")
        else "off (in-flight dedupe only)"
    )
    table = Table(title=f"Embedding cache: {state}", title_justify="left")
    table.add_column("model")
    columns = (
        "memory hits",
        "redis hits",
        "redis refused",
        "misses",
        "hit rate",
        "joined in flight",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for name, c in cache.items():
        if name == "(all models)":
            continue
        hits = c.get("hits_memory", 0) + c.get("hits_redis", 0)
        looked = hits + c.get("misses", 0)
        table.add_row(
            name,
            str(c.get("hits_memory", 0)),
            str(c.get("hits_redis", 0)),
            str(c.get("redis_refused", 0)),
            str(c.get("misses", 0)),
            f"{hits / looked:.0%}" if looked else "-",
            str(c.get("dedupe_joined", 0)),
        )
    return table


def _generic_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title.capitalize(), title_justify="left")
    table.add_column("name")
    if all(isinstance(v, dict) for v in rows.values()):
        keys = list(dict.fromkeys(k for v in rows.values() for k in v))
        for key in keys:
            table.add_column(key, justify="right")
        for name, v in rows.items():
            table.add_row(name, *(str(v.get(k, "-")) for k in keys))
    else:
        table.add_column("value", justify="right")
        for name, v in rows.items():
            table.add_row(name, str(v))
    return table


def render_health(health: dict[str, Any], console: Console) -> None:
    def mark(ok: bool) -> str:
        return "[green]ok[/]" if ok else "[red]no[/]"

    table = Table(title=f"Health of {health['url']}", title_justify="left")
    table.add_column("probe")
    table.add_column("result")
    table.add_column("detail")
    table.add_row("live", mark(health["live"]), "/health/live")
    table.add_row("ready", mark(health["ready"]), health["status"])
    console.print(table)
