"""``embedplex status`` and ``embedplex health``: read a running server, print rich tables.

Both speak HTTP to the server (``/api/v1/status``, ``/health/live``, ``/health/ready``); with
``--json`` they print the raw document for scripts. An answer that is no embedplex JSON (a
proxy's HTML page) raises ``NotEmbedplexAnswer``. Every string the server sends is shown as
plain text (``Text``), never parsed as rich markup: an endpoint ``http://[fd00::5]:8080`` or a
reason naming ``[/tmp/model]`` prints as it is.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text

from embedplex.cli.server_errors import error_message, json_document


class StatusRefused(Exception):
    """The server answered /api/v1/status with an error; the text is its own message."""


# What a refusal of the admin route means for whoever ran the command.
_REFUSAL_HINTS = {
    401: "pass the server's admin secret with --admin-secret or EMBEDPLEX_ADMIN_SECRET",
}


def fetch_status(
    url: str, *, admin_secret: str | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """GET /api/v1/status (an admin route); raises ``httpx.HTTPError`` when unreachable,
    ``httpx.InvalidURL`` when ``url`` is none, ``StatusRefused`` with the server's own message
    when refused (403: the server has no admin secret; 401: a missing or wrong one) and
    ``NotEmbedplexAnswer`` when the answer is no status document."""
    headers = {"authorization": f"Bearer {admin_secret}"} if admin_secret else {}
    r = httpx.get(url.rstrip("/") + "/api/v1/status", headers=headers, timeout=timeout)
    if r.status_code >= 400:
        hint = _REFUSAL_HINTS.get(r.status_code)
        raise StatusRefused(f"{r.status_code}: {error_message(r)}" + (f" ({hint})" if hint else ""))
    return json_document(r, ready=bool, status=str, models=dict)


def fetch_health(url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """Liveness and readiness. ``reachable`` (and ``live``, ``ready``) is False when the server
    cannot be reached; a probe's answer that is no ``{"status": str}`` raises
    ``NotEmbedplexAnswer``."""
    base = url.rstrip("/")
    try:
        live = httpx.get(base + "/health/live", timeout=timeout)
        ready = httpx.get(base + "/health/ready", timeout=timeout)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: "...:8080x"
        return {
            "url": base,
            "reachable": False,
            "live": False,
            "ready": False,
            "status": f"unreachable: {exc}",
        }
    json_document(live, status=str)
    return {
        "url": base,
        "reachable": True,
        "live": live.status_code == 200,
        "ready": ready.status_code == 200,
        "status": json_document(ready, status=str)["status"],
    }


def _dict(value: Any) -> dict[str, Any]:
    """A section or field the renderer walks: the value when it is a dict, else empty (a
    document of another shape renders as blanks, never as a traceback)."""
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float:
    """A field the renderer computes with: the value when it is a finite number, else 0
    (JSON as Python reads it may hold NaN or Infinity)."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


def _cells(*values: Any) -> list[Text]:
    """Table cells as plain ``Text``: a server's string is never read as markup."""
    return [v if isinstance(v, Text) else Text(str(v)) for v in values]


def _title(text: str) -> Text:
    return Text(text, style="table.title")


def _named(name: Any, detail: str) -> Text:
    """A row's name with a dim detail line under it (backend, provider type and endpoint)."""
    return Text.assemble(str(name), "\n", (detail, "dim"))


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def _errors(errors: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(_dict(errors).items())) or "-"


def render_status(payload: dict[str, Any], console: Console, url: str = "") -> None:
    ready = payload.get("ready")
    state = Text("ready", "green") if ready else Text(str(payload.get("status")), "red")
    console.print(
        Text.assemble(
            f"embedplex {payload.get('version', '?')} at {url or 'server'}: ",
            state,
            f", up {_duration(_number(payload.get('uptime_s')))}",
        )
    )
    table = Table(title="Models", title_justify="left")
    table.add_column("model", no_wrap=True)
    for column in ("queued", "running", "max batch", "inputs/s", "tokens/s", "batches"):
        table.add_column(column, justify="right")
    table.add_column("batch mean/max", justify="right")
    table.add_column("errors")
    models = {name: _dict(m) for name, m in _dict(payload.get("models")).items()}
    for name, m in models.items():
        recent = _dict(m.get("recent"))
        table.add_row(
            *_cells(
                _named(name, f"{m.get('backend')} {m.get('device')} {m.get('dtype')}"),
                m.get("queued", "-"),
                f"{m.get('active_requests', '-')} req / {m.get('in_flight_batches', '-')} bat",
                m.get("max_batch_requests", "-"),
                f"{_number(recent.get('inputs_per_s')):.1f}",
                f"{_number(recent.get('tokens_per_s')):.1f}",
                recent.get("batches", 0),
                f"{_number(recent.get('mean_batch_size')):.1f} / {recent.get('max_batch_size', 0)}",
                _errors(m.get("errors")),
            )
        )
    console.print(table)
    window = next((_number(_dict(m.get("recent")).get("window_s")) for m in models.values()), 0)
    if window:
        console.print(Text(f"rates over the last {window:g}s"))
    replicated = {n: m for n, m in models.items() if m.get("runtime") == "ray"}
    if replicated:
        console.print(_ray_table(replicated))
    providers = _dict(payload.get("providers"))
    if providers:
        console.print(_providers_table(providers))
    cache = _dict(payload.get("cache"))
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
        p = _dict(p)
        health = _dict(p.get("health"))
        counters = _dict(p.get("counters"))
        calls = _number(counters.get("upstream_calls"))
        texts = _number(counters.get("texts"))
        circuit = str(health.get("circuit", "-"))
        colour = {"closed": "green", "open": "red"}.get(circuit, "yellow")
        lanes = p.get("lanes", [])
        table.add_row(
            *_cells(
                _named(name, f"{p.get('type')} {p.get('endpoint')}"),
                Text(circuit, colour),
                _dict(p.get("aimd")).get("batch_size", "-"),
                p.get("queued", "-"),
                p.get("in_flight_batches", "-"),
                len(lanes) if isinstance(lanes, list) else "-",
                counters.get("upstream_calls", 0),
                counters.get("texts", 0),
                f"{texts / calls:.1f}" if calls else "-",
                f"{_number(health.get('success_rate')):.0%}, "
                f"{_number(health.get('latency_p50_ms')):.0f}/"
                f"{_number(health.get('latency_p99_ms')):.0f} ms",
            )
        )
    return table


def _ray_table(models: dict[str, dict[str, Any]]) -> Table:
    """Models served by Ray Serve replicas: replica states and who answered what."""
    table = Table(title="Ray Serve replicas", title_justify="left")
    table.add_column("model")
    table.add_column("replicas")
    table.add_column("requests per replica")
    for column in ("retried", "failed"):
        table.add_column(column, justify="right")
    for name, m in models.items():
        states = _dict(m.get("replicas"))
        per_replica = _dict(m.get("requests_per_replica"))
        table.add_row(
            *_cells(
                _named(name, str(m.get("app"))),
                ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items())) or "none",
                ", ".join(f"{k} {v}" for k, v in sorted(per_replica.items())) or "-",
                m.get("retries", 0),
                m.get("replica_failures", 0),
            )
        )
    return table


def _cache_table(cache: dict[str, Any]) -> Table:
    """The embedding cache: its fill in the title, then each model's hits, refused Redis values
    (another shape or out of range: each also a miss), misses and joins."""
    shared = _dict(cache.get("(all models)"))
    mib = 1024 * 1024
    state = (
        f"{_number(shared.get('bytes')) / mib:.1f} of "
        f"{_number(shared.get('max_bytes')) / mib:.0f} MiB, "
        f"{shared.get('entries', 0)} entries, {shared.get('evictions', 0)} evicted, "
        f"redis {shared.get('redis', 'off')}"
        if shared.get("enabled")
        else "off (in-flight dedupe only)"
    )
    table = Table(title=_title(f"Embedding cache: {state}"), title_justify="left")
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
        c = _dict(c)
        hits = _number(c.get("hits_memory")) + _number(c.get("hits_redis"))
        looked = hits + _number(c.get("misses"))
        table.add_row(
            *_cells(
                name,
                c.get("hits_memory", 0),
                c.get("hits_redis", 0),
                c.get("redis_refused", 0),
                c.get("misses", 0),
                f"{hits / looked:.0%}" if looked else "-",
                c.get("dedupe_joined", 0),
            )
        )
    return table


def _generic_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=_title(title.capitalize()), title_justify="left")
    table.add_column("name")
    if all(isinstance(v, dict) for v in rows.values()):
        keys = list(dict.fromkeys(k for v in rows.values() for k in v))
        for key in keys:
            table.add_column(Text(str(key)), justify="right")
        for name, v in rows.items():
            table.add_row(*_cells(name, *(v.get(k, "-") for k in keys)))
    else:
        table.add_column("value", justify="right")
        for name, v in rows.items():
            table.add_row(*_cells(name, v))
    return table


def render_health(health: dict[str, Any], console: Console) -> None:
    def mark(ok: bool) -> Text:
        return Text("ok", "green") if ok else Text("no", "red")

    table = Table(title=_title(f"Health of {health['url']}"), title_justify="left")
    table.add_column("probe")
    table.add_column("result")
    table.add_column("detail")
    table.add_row(*_cells("live", mark(health["live"]), "/health/live"))
    table.add_row(*_cells("ready", mark(health["ready"]), health["status"]))
    console.print(table)
