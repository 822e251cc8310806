"""``embedplex providers add|list|remove``: the provider registry of a running server.

The commands talk to the server's admin API (``/api/v1/providers``) with the admin secret from
``EMBEDPLEX_ADMIN_SECRET``; a change is kept in the server's state store, takes effect on that
server at once and on every replica sharing the store within seconds, and survives restarts
(docs/keys.md). ``add --save FILE`` also appends the provider to a TOML config file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from embedplex.cli.server_errors import NotEmbedplexAnswer, error_message, json_document
from embedplex.providers.config import ProviderConfig

providers_app = typer.Typer(help="Manage the remote providers of a running server.")

ServerOption = Annotated[
    str,
    typer.Option("--server", envvar="EMBEDPLEX_SERVER", help="Base URL of the running server."),
]


def _request(
    method: str, server: str, path: str, body: Any = None, **shape: type
) -> dict[str, Any]:
    """The server's JSON object (each key of ``shape`` of its type); an error, or an answer
    that is no embedplex document (a proxy's page), is one line and exit 1."""
    headers = {}
    secret = os.environ.get("EMBEDPLEX_ADMIN_SECRET")
    if secret:
        headers["authorization"] = f"Bearer {secret}"
    try:
        response = httpx.request(
            method, server.rstrip("/") + path, json=body, headers=headers, timeout=30
        )
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"cannot reach {server}: {exc}") from exc
    if response.status_code >= 400:
        typer.echo(f"error {response.status_code}: {error_message(response)}", err=True)
        raise typer.Exit(1)
    if not response.content:
        return {}
    try:
        return json_document(response, **shape)
    except NotEmbedplexAnswer as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def toml_block(config: ProviderConfig) -> str:
    """A ``[[providers]]`` table with the fields that differ from the defaults."""
    lines = ["", "[[providers]]"]
    defaults = {key: field.default for key, field in ProviderConfig.model_fields.items()}
    for key, value in config.model_dump(mode="json").items():
        if value is None or (key not in ("name", "type") and value == defaults.get(key)):
            continue
        # JSON strings, numbers and booleans are valid TOML values.
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@providers_app.command("add")
def add(
    name: Annotated[str, typer.Option(help="Provider name (used in routes and requests).")],
    type_: Annotated[str, typer.Option("--type", help="tei, openai, voyage or cohere.")],
    endpoint: Annotated[str | None, typer.Option(help="Base or full embeddings URL.")] = None,
    model: Annotated[str | None, typer.Option(help="Upstream model name.")] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Name of the env var holding the API key (on the server; one of its "
            "provider_key_envs)."
        ),
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Texts per upstream call.")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Batch fill wait.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Calls in flight.")] = None,
    serve_as: Annotated[
        str | None, typer.Option(help="Also serve it under this model name.")
    ] = None,
    save: Annotated[
        Path | None, typer.Option(help="Append the provider to this TOML config too.")
    ] = None,
    server: ServerOption = "http://127.0.0.1:8080",
) -> None:
    """Add a provider to a running server (and optionally to a config file)."""
    fields = {
        "name": name,
        "type": type_,
        "endpoint": endpoint,
        "model": model,
        "api_key_env": api_key_env,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "max_concurrency": max_concurrency,
    }
    try:
        config = ProviderConfig.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    body = {"provider": config.model_dump(mode="json"), "serve_as": serve_as}
    _request("POST", server, "/api/v1/providers", body)
    typer.echo(f"added provider {name}" + (f" (served as {serve_as})" if serve_as else ""))
    if save is not None:
        with save.open("a") as f:
            f.write(toml_block(config))
        typer.echo(f"appended to {save}")


@providers_app.command("list")
def list_(
    server: ServerOption = "http://127.0.0.1:8080",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the providers of a running server."""
    data = _request("GET", server, "/api/v1/providers", data=list)["data"]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"{'NAME':<20} {'TYPE':<8} {'CIRCUIT':<10} {'MODEL':<32} ENDPOINT")
    for p in data:
        typer.echo(
            f"{p['name']:<20} {p['type']:<8} {p['circuit']:<10} {p.get('model') or '-':<32} "
            f"{p.get('endpoint') or '(vendor default)'}"
        )


@providers_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="Provider to remove.")],
    server: ServerOption = "http://127.0.0.1:8080",
) -> None:
    """Remove a provider from a running server (its queued texts are finished first)."""
    _request("DELETE", server, f"/api/v1/providers/{name}")
    typer.echo(f"removed provider {name}")
