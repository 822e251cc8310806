"""The ``embedplex`` command line. Thin: it builds settings and calls into the package."""

from __future__ import annotations

import enum
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from embedplex import __version__
from embedplex.bench.cli import bench_app
from embedplex.config import Settings

app = typer.Typer(help="embedplex: embedding server and batching gateway.", no_args_is_help=True)
config_app = typer.Typer(help="Write or show configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

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
    if annotation is SecretStr or origin is list:
        return str
    return annotation


def _settings_options() -> list[inspect.Parameter]:
    params = []
    hints = typing.get_type_hints(Settings)
    field: FieldInfo
    for name, field in Settings.model_fields.items():
        kind = _flag_type(name, hints[name])
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if kind is bool else [flag]
        option = typer.Option(None, *decls, help=field.description, show_default=False)
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None
            )
        )
    return params


def _with_settings_flags(func: Any) -> Any:
    """Give ``func`` one flag per settings field, so each option is declared only once."""
    own = [p for p in inspect.signature(func).parameters.values() if p.name != "overrides"]
    params = own + _settings_options()
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def _load(config: Path | None, overrides: dict[str, Any]) -> Settings:
    overrides = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in overrides.items()}
    try:
        return Settings.load(config, **overrides)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command()
@_with_settings_flags
def serve(config: ConfigOption = None, **overrides: Any) -> None:
    """Serve the configured model(s) over HTTP."""
    from embedplex.logs import setup_logging
    from embedplex.server import serve as run_server

    settings = _load(config, overrides)
    setup_logging(settings.log_level, settings.log_format)
    run_server(settings)


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


def default_toml() -> str:
    lines = [
        "# embedplex configuration. Precedence: defaults < this file < EMBEDPLEX_* env < flags.",
        "# Uncomment a line to change it.",
        "",
    ]
    defaults = Settings.model_construct().model_dump(mode="json")
    for name, field in Settings.model_fields.items():
        lines.append(f"# {field.description}")
        value = defaults.get(name)
        if value is None:
            lines.append(f"# {name} =")
        else:
            lines.append(f"# {name} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
