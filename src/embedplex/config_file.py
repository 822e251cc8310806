"""The config file's mistakes, each told in one line that names the file and the place.

pydantic's ``extra_forbidden`` names a misspelt key but offers nothing close to it, and
tomllib's syntax error names no file. ``Settings.load`` raises ``ConfigFileError`` instead,
whose lines the CLI prints as they are (exit status 2, no traceback)::

    unknown setting 'max_batch_token' in app.toml; did you mean 'max_batch_tokens'?
    unknown setting 'urll' in [[providers]] table 2 of app.toml; did you mean 'url'?
    app.toml is not valid TOML: illegal character (line 3, column 31)

Neither quotes a value, which may be a secret: tomllib's message quotes the character it
stopped at, which may sit inside one (an API key with a control character in it), so that
character is left out. A table in the environment (``EMBEDPLEX_PROVIDERS='[{...}]'``) is named
by its variable.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from embedplex.config_env import ENV_PREFIX


class ConfigFileError(ValueError):
    """Settings that cannot be read as they are written: ``lines``, one per mistake."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


# tomllib's "(at line 3, column 31)" or "(at end of document)", at the end of its message
# (Python 3.14 also gives them as attributes: read first, where present).
_WHERE = re.compile(
    r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$", re.S
)
# "Illegal character '\x07'", "Found invalid character 'x'": the character may be a secret's.
_QUOTED_CHARACTER = re.compile(r"\bcharacter\s+['\"].*$", re.S)


def unreadable(path: Path, exc: tomllib.TOMLDecodeError | UnicodeDecodeError) -> ConfigFileError:
    """``path is not valid TOML: <tomllib's reason> (line L, column C)``, no character quoted;
    for a file that is no UTF-8 text (TOML is UTF-8), the byte's place, never the byte."""
    if isinstance(exc, UnicodeDecodeError):
        at = exc.object[: exc.start].count(b"\n") + 1
        return ConfigFileError([f"{path} is not valid TOML: not UTF-8 text (line {at})"])
    text = str(exc)
    match = _WHERE.match(text)
    reason = getattr(exc, "msg", None) or (match["msg"] if match else text)
    line: object = getattr(exc, "lineno", None) or (match["line"] if match else None)
    column: object = getattr(exc, "colno", None) or (match["col"] if match else None)
    reason = _QUOTED_CHARACTER.sub("character", reason)
    reason = reason[:1].lower() + reason[1:]
    where = f"line {line}, column {column}" if line else "at the end of the file"
    return ConfigFileError([f"{path} is not valid TOML: {reason} ({where})"])


def unknown_settings(
    exc: ValidationError,
    settings: type[BaseModel],
    config_file: Path | None,
    environ: Mapping[str, str],
) -> ConfigFileError | None:
    """One line per key that no setting or table has (pydantic's ``extra_forbidden``), with
    the closest known name; None when there is none (other errors stand as pydantic said)."""
    lines = [
        _unknown(error["loc"], settings, config_file, environ)
        for error in exc.errors()
        if error["type"] == "extra_forbidden" and error["loc"]
    ]
    return ConfigFileError(lines) if lines else None


def _unknown(
    loc: tuple[int | str, ...],
    settings: type[BaseModel],
    config_file: Path | None,
    environ: Mapping[str, str],
) -> str:
    key = str(loc[-1])
    model, place = _holder(settings, loc[:-1])
    source = _source(loc, config_file, environ)
    where = " ".join(p for p in (place, "of" if place and source else "", source) if p)
    text = f"unknown setting {key!r}{' in ' + where if where else ''}"
    if model is None:
        return text
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    if close:  # the table's own key first: api_key in [[providers]] is api_key_env, not ours
        named = close[0]
        if named.endswith("_env"):
            return (
                f"{text}; did you mean {named!r}? (the name of the environment variable "
                "that holds the value, never the value)"
            )
        return f"{text}; did you mean {named!r}?"
    top = settings.model_fields.get(key)
    if model is settings or top is None:
        return text
    if "SecretStr" in str(top.annotation):  # never advise making a table's secret the server's
        return f"{text}: no such key in this table"
    if source != str(config_file):  # a table in an environment variable
        return f"{text}: {key} is a top-level setting ({ENV_PREFIX}{key.upper()}), not a table's"
    # TOML puts every key after a [[table]] line in that table, wherever it was meant.
    return (
        f"{text}: {key} is a top-level setting, and every key below a [[table]] line "
        "belongs to that table; move it above the first [[table]]"
    )


def _holder(
    settings: type[BaseModel], path: Sequence[int | str]
) -> tuple[type[BaseModel] | None, str]:
    """The model whose keys ``path`` leads to, and how to name the place (``[[providers]]
    table 2``, ``autoscaling of [[models]] table 1``; empty at the top level); None for the
    model where the path leaves the fields."""
    model: type[BaseModel] = settings
    place = ""
    parts = list(path)
    while parts:
        name = parts.pop(0)
        field = model.model_fields.get(name) if isinstance(name, str) else None
        inner, is_list = _model_of(field.annotation if field is not None else None)
        if inner is None:
            return None, place
        here = str(name)
        if is_list and parts and isinstance(parts[0], int):
            number = int(parts.pop(0)) + 1
            here = f"[[{name}]] table {number}" if not place else f"{name} item {number}"
        place = f"{here} of {place}" if place else here
        model = inner
    return model, place


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds (``X``, ``X | None``, ``list[X]``) and whether it is a list."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _model_of(arg)
            if found[0] is not None:
                return found
        return None, False
    if origin is list:
        args = get_args(annotation)
        return (_model_of(args[0])[0] if args else None), True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _source(
    loc: tuple[int | str, ...], config_file: Path | None, environ: Mapping[str, str]
) -> str:
    """Where the key was written: the table's environment variable when one is set (it wins
    over the file), else the file; empty when neither (settings given in code)."""
    if len(loc) > 1:
        variable = f"{ENV_PREFIX}{str(loc[0]).upper()}"
        if any(name.upper() == variable for name in environ):
            return variable
    return str(config_file) if config_file is not None else ""
