"""The ``embedplex`` command line. Thin: it builds settings and calls into the package."""

from __future__ import annotations

import enum
import inspect
import json
import logging
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from embedplex import __version__
from embedplex.bench.cli import bench_app
from embedplex.cli.keys import db_app, keys_app
from embedplex.cli.providers import providers_app
from embedplex.cli.settings import load_settings
from embedplex.config import Settings, split_list
from embedplex.config_tei import tei_env_findings

app = typer.Typer(
    help="embedplex: embedding server and batching gateway.",
    no_args_is_help=True,
    # Every command, as TEI's router and most servers take it; click hands it down.
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Write or show configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(providers_app, name="providers")
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (also EMBEDPLEX_CONFIG)."),
]


def _flag_type(name: str, annotation: Any) -> Any:
    """The type typer should parse a settings field as (Optional unwrapped, Literal as Enum)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _flag_type(name, args[0])
    if origin is Literal:
        values = [str(a) for a in get_args(annotation)]
        return enum.Enum(name, {v: v for v in values}, type=str)
    if origin is list:  # a repeatable flag (``_list_values`` joins the repeats)
        return list[str]
    if annotation is SecretStr:
        return str
    return annotation


def _is_table_list(annotation: Any) -> bool:
    """list[SomeModel]: configured as TOML tables (or JSON in env), not as a flag."""
    if get_origin(annotation) is not list:
        return False
    args = get_args(annotation)
    return bool(args) and isinstance(args[0], type) and issubclass(args[0], BaseModel)


def _help(field: FieldInfo, annotation: Any) -> str | None:
    """A flag's help with the setting's default, as ``--help`` shows defaults. The flag's own
    default is None (a flag not given leaves the file and the environment in force), so
    typer's ``show_default`` would show nothing true. No default for a secret, nor for one
    that is none or empty."""
    value = field.get_default(call_default_factory=True)
    if "SecretStr" in str(annotation) or value is None or value == []:
        return field.description
    shown = json.dumps(value) if isinstance(value, bool) else str(value)
    # Escaped: typer renders help as rich markup, where [default: ...] would be a tag.
    return f"{field.description} \\[default: {shown}]"


# TEI's spelling of a flag whose meaning is ours too (text-embeddings-router --help): taken,
# and listed beside ours, so a command line brought from TEI starts. Only the flags: TEI's
# HOSTNAME and PORT variables are never read (every shell and platform sets them; config_tei.py).
_TEI_SPELLINGS = {
    "host": ("--hostname",),
    "port": ("-p",),
    # TEI's takes origins one a flag, "*" for any: ours too (Starlette's CORS reads "*" so).
    "cors_allow_origins": ("--cors-allow-origin",),
}
# TEI's --json-output: a switch, as there, for --log-format json (_load).
JsonOutputOption = typer.Option(
    None,
    "--json-output",
    help="JSON log lines, as TEI's flag: the same as --log-format json.",
    show_default=False,
)
# TEI's --prometheus-port is not our --metrics-port: TEI's HTTP server never listens on it
# (only its gRPC build serves metrics there; over HTTP /metrics is on the main port alone),
# where --metrics-port moves /metrics off the main port. Taken and ignored as TEI's HTTP
# server ignores it, with a warning (serve), so a TEI command line starts and scrapes of the
# main port go on answering.
PrometheusPortOption = typer.Option(
    None,
    "--prometheus-port",
    min=0,
    max=65535,
    help="TEI's flag, ignored as TEI's HTTP server ignores it: /metrics stays on the main "
    "port (--metrics-port serves it on a port of its own).",
    show_default=False,
)


def _settings_options() -> list[inspect.Parameter]:
    params = []
    hints = typing.get_type_hints(Settings)
    field: FieldInfo
    for name, field in Settings.model_fields.items():
        if _is_table_list(hints[name]):
            continue
        kind = _flag_type(name, hints[name])
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if kind is bool else [flag]
        decls += _TEI_SPELLINGS.get(name, ())
        option = typer.Option(None, *decls, help=_help(field, hints[name]), show_default=False)
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None
            )
        )
    return params


def _with_settings_flags(func: Any) -> Any:
    """Give ``func`` one flag per settings field, so each option is declared only once."""
    # With postponed annotations the signature holds strings, and typer would not see the
    # Annotated option metadata in them (``-c`` was lost): resolve the real types first.
    hints = typing.get_type_hints(func, include_extras=True)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(func).parameters.values()
        if p.name != "overrides"
    ]
    tei_only = [
        inspect.Parameter(
            "json_output", inspect.Parameter.KEYWORD_ONLY, default=JsonOutputOption, annotation=bool
        ),
        inspect.Parameter(
            "prometheus_port",
            inspect.Parameter.KEYWORD_ONLY,
            default=PrometheusPortOption,
            annotation=int | None,
        ),
    ]
    params = [*own, *_settings_options(), *tei_only]
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def _flag_value(value: Any) -> Any:
    """A flag's value as the settings take it. A list flag given several times keeps every
    value (``--cors-allow-origins a --cors-allow-origins b,c`` is a, b and c), each one
    comma-separated or a JSON list, as the environment variable's value is."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [item for each in value for item in split_list(each)]
    return value


def _load(config: Path | None, overrides: dict[str, Any]) -> Settings:
    overrides = {k: _flag_value(v) for k, v in overrides.items() if k != "prometheus_port"}
    if overrides.pop("json_output", None):
        if overrides.get("log_format") not in (None, "json"):
            raise typer.BadParameter(
                f"--json-output is --log-format json, and --log-format {overrides['log_format']} "
                "was given too: give one"
            )
        overrides["log_format"] = "json"
    return load_settings(config, **overrides)


@app.command()
@_with_settings_flags
def serve(config: ConfigOption = None, **overrides: Any) -> None:
    """Serve the configured model(s) over HTTP."""
    from embedplex.observability.logs import setup_logging
    from embedplex.serve.server import BAD_START, StartupError
    from embedplex.serve.server import serve as run_server

    settings = _load(config, overrides)
    tei = tei_env_findings(os.environ, settings)
    if tei.refused is not None:
        typer.echo(f"embedplex: {tei.refused}", err=True)
        raise typer.Exit(BAD_START)
    setup_logging(settings.log_level, settings.log_format)
    for warning in tei.warnings:
        logging.getLogger("embedplex.config").warning("%s", warning)
    if overrides.get("prometheus_port") is not None:
        logging.getLogger("embedplex.config").warning(
            "--prometheus-port is ignored, as TEI's HTTP server ignores it: /metrics is served "
            "on the main port (--metrics-port serves it on a port of its own instead)"
        )
    try:
        run_server(settings)
    except StartupError as exc:
        typer.echo(f"embedplex: {exc}", err=True)
        raise typer.Exit(BAD_START) from None


@config_app.command("show")
@_with_settings_flags
def config_show(config: ConfigOption = None, **overrides: Any) -> None:
    """Print the effective configuration (secrets redacted) as JSON."""
    typer.echo(json.dumps(_load(config, overrides).redacted(), indent=2))


@config_app.command("init")
def config_init(
    path: Annotated[Path, typer.Argument(help="Where to write the file.")] = Path("embedplex.toml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented TOML file with every setting at its default."""
    if path.exists() and not force:
        raise typer.BadParameter(f"{path} exists; pass --force to overwrite")
    path.write_text(default_toml())
    typer.echo(f"wrote {path}")


_TABLE_EXAMPLES = {
    "models": (
        "[[models]]                # several local models; unset keys take the values above",
        'name     = "minilm"',
        'model_id  = "sentence-transformers/all-MiniLM-L6-v2"',
        'kind     = "embed"        # embed | rerank (default: read from the model files)',
        'load     = "eager"        # eager: at start; lazy: on its first request (needs kind)',
    ),
    "providers": (
        "[[providers]]",
        'name = "voyage"',
        'type = "voyage"            # tei | openai | voyage | cohere',
        'model = "voyage-code-3"',
        'api_key_env = "VOYAGE_API_KEY"   # the key itself never goes in this file',
        "max_batch_size = 128",
        "max_wait_ms = 50",
    ),
    "routes": (
        "[[routes]]",
        'model = "code-embeddings"',
        'providers = ["voyage"]',
        'policy = "any"            # any: first healthy, fail over; all: every provider',
    ),
    "api_keys": (
        "[[api_keys]]              # static keys, each its own tenant (docs/scheduling.md)",
        'id = "nightly-reindex"    # in logs and metrics; the key never is',
        'key = "..."               # at least 16 characters; better in EMBEDPLEX_API_KEYS',
        'priority = "batch"        # interactive | batch (a request may lower its own)',
        "weight = 1                # its share of a model under fair queuing",
    ),
}


def default_toml() -> str:
    lines = [
        "# embedplex configuration. Precedence: defaults < this file < EMBEDPLEX_* env < flags.",
        "# Uncomment a line to change it.",
        "",
    ]
    defaults = Settings.model_construct().model_dump(mode="json")
    hints = typing.get_type_hints(Settings)
    for name, field in Settings.model_fields.items():
        lines.append(f"# {field.description}")
        if _is_table_list(hints[name]):
            lines.extend(f"# {line}" for line in _TABLE_EXAMPLES.get(name, ()))
            lines.append("")
            continue
        value = defaults.get(name)
        if value is None:
            lines.append(f"# {name} =")
        else:
            lines.append(f"# {name} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _console() -> Any:
    """A console at least 120 columns wide when piped (rich would assume 80)."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


UrlOption = Annotated[str, typer.Option("--url", help="Base URL of the running server.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON document.")]


@app.command()
def status(
    url: UrlOption = "http://127.0.0.1:8080",
    as_json: JsonOption = False,
    admin_secret: Annotated[
        str | None,
        typer.Option(
            envvar="EMBEDPLEX_ADMIN_SECRET",
            help="The server's admin secret (/api/v1/status is an admin route).",
        ),
    ] = None,
) -> None:
    """Show a running server's models, queues, recent throughput, batch sizes and errors."""
    import httpx

    from embedplex.cli.server_errors import NotEmbedplexAnswer
    from embedplex.cli.status import StatusRefused, fetch_status, render_status

    try:
        payload = fetch_status(url, admin_secret=admin_secret)
    except (httpx.HTTPError, httpx.InvalidURL, StatusRefused, NotEmbedplexAnswer) as exc:
        typer.echo(f"cannot read {url}/api/v1/status: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        render_status(payload, _console(), url)


@app.command()
def health(url: UrlOption = "http://127.0.0.1:8080", as_json: JsonOption = False) -> None:
    """Probe a running server; exits 0 when ready, 1 when it answers not ready (loading,
    draining, a model dead: even once /health/live is 503), 2 when it cannot be reached or its
    answer is no embedplex one (a proxy's page)."""
    from embedplex.cli.server_errors import NotEmbedplexAnswer
    from embedplex.cli.status import fetch_health, render_health

    try:
        result = fetch_health(url)
    except NotEmbedplexAnswer as exc:
        typer.echo(f"cannot read {exc.url}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_health(result, _console())
    if not result["ready"]:
        raise typer.Exit(1 if result["reachable"] else 2)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
