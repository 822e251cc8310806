"""Reading a model directory's JSON files: every fault is a start error that names the file.

A model directory is operator input: a file that is not JSON, or a value of the wrong shape,
stops the start with a ``FatalBackendError`` saying which file and which key, never a bare
``JSONDecodeError`` or an ``AttributeError`` from deep in the loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedplex.core.errors import FatalBackendError


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FatalBackendError(f"{path}: cannot read it as JSON ({exc})") from exc


def read_object(path: Path, *, required: bool = False) -> dict[str, Any]:
    """A JSON object file; ``{}`` when it is absent and not ``required``."""
    if not path.is_file():
        if required:
            raise FatalBackendError(f"{path} is missing")
        return {}
    data = _load(path)
    if not isinstance(data, dict):
        raise FatalBackendError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_list(path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects (``modules.json``); ``[]`` when the file is absent."""
    if not path.is_file():
        return []
    data = _load(path)
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        raise FatalBackendError(f"{path}: expected a JSON array of objects")
    return data


def get_int(
    data: dict[str, Any], key: str, default: int, file: Path, *, minimum: int | None = None
) -> int:
    """``data[key]`` as an int (``default`` when absent or null), refused when it is not one."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise FatalBackendError(f"{file}: {key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise FatalBackendError(f"{file}: {key} must be at least {minimum}, got {value}")
    return value


def get_bool(data: dict[str, Any], key: str, default: bool, file: Path) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FatalBackendError(f"{file}: {key} must be true or false, got {value!r}")
    return value


def get_prompts(data: dict[str, Any], file: Path) -> dict[str, str]:
    """``prompts``: names to prompt texts."""
    prompts = data.get("prompts")
    if prompts is None:
        return {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise FatalBackendError(
            f'{file}: prompts must be an object of names to texts ({{"query": "query: "}}), '
            f"got {json.dumps(prompts)[:100]}"
        )
    return prompts


def get_str(data: dict[str, Any], key: str, file: Path) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise FatalBackendError(f"{file}: {key} must be a string, got {value!r}")
    return value
