"""``embedplex keys create|list|revoke|rotate|usage`` and ``embedplex db upgrade``.

These work on the state store itself (``state_url``, from ``--config``, ``EMBEDPLEX_STATE_URL``
or ``--state-url``: the same settings the server reads), not through a server, so an operator
can issue the first key before any server runs. Running servers see a change within seconds
(docs/keys.md). A new or rotated key is printed once; nothing can show it again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from embedplex.cli.settings import load_settings
from embedplex.core.tenant import Priority
from embedplex.state.keys import (
    LIMIT_MAX,
    KeyRecord,
    KeySpec,
    KeyStore,
    KeyStoreError,
    duration,
)
from embedplex.state.store import StateStore, StoreOpenError, open_store
from embedplex.state.usage import usage_since

T = TypeVar("T")

# The store the running command used, said on stderr after its output (see _say_store).
_STORE_USED: ContextVar[str | None] = ContextVar("embedplex_keys_store", default=None)


def _say_store(*_: Any, **__: Any) -> None:
    """After a keys command: which store it used (a key made after ``serve --data-dir X`` in
    the default store would otherwise go unnoticed). Not for --json, whose reader parses."""
    where = _STORE_USED.get()
    if where is not None:
        typer.echo(f"state store: {where}", err=True)
        _STORE_USED.set(None)


keys_app = typer.Typer(
    help="Manage API keys in the state store.", no_args_is_help=True, result_callback=_say_store
)
db_app = typer.Typer(help="The state store's schema.", no_args_is_help=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (also EMBEDPLEX_CONFIG)."),
]
StateUrlOption = Annotated[
    str | None,
    typer.Option(
        "--state-url", help="State store URL (also EMBEDPLEX_STATE_URL; default: SQLite)."
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the default SQLite store lives, as serve --data-dir (also "
        "EMBEDPLEX_DATA_DIR); ignored when a state URL is set.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]


def parse_duration(text: str) -> timedelta:
    try:
        return duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_since(text: str) -> datetime:
    """A duration back from now (``24h``) or an ISO date or time (UTC unless it says)."""
    if text.strip()[-1:] in "smhdw":
        return datetime.now(UTC) - parse_duration(text)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: a duration (24h) or an ISO date") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _run(
    config: Path | None,
    state_url: str | None,
    data_dir: Path | None,
    work: Callable[[KeyStore], Awaitable[T]],
    quiet: bool = False,
) -> T:
    """Run ``work`` on the store the settings name; unless ``quiet`` (JSON output), say which
    store on stderr once the command is done, so a key made in the wrong store is noticed."""
    settings = load_settings(config, state_url=state_url, data_dir=data_dir)

    async def go(store: StateStore) -> tuple[str, T]:
        return store.describe(), await work(KeyStore(store))

    try:
        where, result = asyncio.run(open_store(settings, go))
        if not quiet:
            _STORE_USED.set(where)
        return result
    except KeyStoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except StoreOpenError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _show(record: KeyRecord, key: str | None, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({**record.public(), **({"key": key} if key else {})}))
        return
    if key is not None:
        typer.echo(key)
        typer.echo(f"key {record.name!r} (id {record.id}): shown once, store it now", err=True)
    else:
        typer.echo(f"{record.name} (id {record.id}): {record.status()}")


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Unique name of the key.")],
    models: Annotated[
        str, typer.Option("--models", help="Served names or patterns, comma-separated.")
    ] = "",
    rpm: Annotated[
        int | None, typer.Option("--rpm", min=1, max=LIMIT_MAX, help="Requests per minute.")
    ] = None,
    tpm: Annotated[
        int | None, typer.Option("--tpm", min=1, max=LIMIT_MAX, help="Tokens per minute.")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option("--max-concurrent", min=1, max=LIMIT_MAX, help="Requests at once.")
    ] = None,
    priority: Annotated[
        Priority, typer.Option("--priority", help="Default priority of its requests.")
    ] = Priority.INTERACTIVE,
    weight: Annotated[int, typer.Option("--weight", min=1, max=1000, help="Fair-queue share.")] = 1,
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lifetime, e.g. 90d, 12h (default: never).")
    ] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    state_url: StateUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a key and print it once."""
    spec = KeySpec(
        name=name,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        priority=priority,
        weight=weight,
        expires_in=None if expires is None else parse_duration(expires),
    )
    record, key = _run(config, state_url, data_dir, lambda ks: ks.create(spec), as_json)
    _show(record, key, as_json)


@keys_app.command("list")
def list_keys(
    as_json: JsonOption = False,
    config: ConfigOption = None,
    state_url: StateUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Every key with its settings and status (never a secret)."""
    records = _run(config, state_url, data_dir, lambda ks: ks.list(), as_json)
    if as_json:
        typer.echo(json.dumps([r.public() for r in records]))
        return
    for r in records:
        limits = f"rpm={r.rpm} tpm={r.tpm} max_concurrent={r.max_concurrent}"
        models = ",".join(r.models) or "*"
        expires = r.expires_at.isoformat(timespec="seconds") if r.expires_at else "never"
        typer.echo(
            f"{r.name}\t{r.id}\t{r.status()}\tmodels={models}\t{limits}\t"
            f"priority={r.priority}\tweight={r.weight}\texpires={expires}"
        )


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    state_url: StateUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key: every server refuses it within seconds."""
    _show(_run(config, state_url, data_dir, lambda ks: ks.revoke(name), as_json), None, as_json)


@keys_app.command("rotate")
def rotate(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    state_url: StateUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Give a key a new secret (printed once); the old one stops working."""
    record, key = _run(config, state_url, data_dir, lambda ks: ks.rotate(name), as_json)
    _show(record, key, as_json)


@keys_app.command("usage")
def usage(
    since: Annotated[
        str | None, typer.Option("--since", help="24h, 7d or an ISO date (default: all).")
    ] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    state_url: StateUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Requests, inputs, tokens and refusals per key, from the store."""
    start = parse_since(since) if since else None
    totals = _run(config, state_url, data_dir, lambda ks: usage_since(ks.store, start), as_json)
    if as_json:
        typer.echo(json.dumps([_row(t) for t in totals]))
        return
    typer.echo("key_id\tname\trequests\tinputs\ttokens\trefusals")
    for t in totals:
        typer.echo(
            f"{t.key_id}\t{t.name or '-'}\t{t.requests}\t{t.inputs}\t{t.tokens}\t{t.refusals}"
        )


def _row(totals: Any) -> dict[str, Any]:
    fields = ("key_id", "name", "requests", "inputs", "tokens", "refusals")
    return {f: getattr(totals, f) for f in fields}


@db_app.command("upgrade")
def upgrade(
    config: ConfigOption = None, state_url: StateUrlOption = None, data_dir: DataDirOption = None
) -> None:
    """Apply the state store's schema migrations (servers also do it on start)."""

    async def noop(ks: KeyStore) -> str:
        return ks.store.describe()

    typer.echo(f"state store up to date: {_run(config, state_url, data_dir, noop, quiet=True)}")
