"""The settings as a command reads them: a mistake is one line on stderr and exit status 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from embedplex.config import Settings
from embedplex.config_file import ConfigFileError

BAD_SETTINGS = 2  # a usage error, as click's own


def load_settings(config: Path | None, **overrides: Any) -> Settings:
    """``Settings.load``; a config file's mistake (``ConfigFileError``) is printed as its own
    lines (``embedplex: unknown setting ...``), any other refusal as click's usage error."""
    try:
        return Settings.load(config, **overrides)
    except ConfigFileError as exc:
        for line in exc.lines:
            typer.echo(f"embedplex: {line}", err=True)
        raise typer.Exit(BAD_SETTINGS) from None
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
