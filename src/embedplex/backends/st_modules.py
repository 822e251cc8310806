"""The sentence-transformers modules of a model directory (``modules.json``) and its pooling.

Served: a ``Transformer``, one ``Pooling`` of a single mode (cls, mean, lasttoken) over every
token, and ``Normalize``. Anything that would change the vectors and that embedplex does not do
is refused at start, named, rather than served as something else: other modules (``Dense``...),
other modes (max, weightedmean...), several modes at once (sentence-transformers concatenates
them), and ``include_prompt: false`` (it leaves prompt tokens out of the pooling).
"""

from __future__ import annotations

import os
import posixpath
from enum import StrEnum
from pathlib import Path
from typing import Any

from embedplex.backends.model_json import get_bool, read_list, read_object
from embedplex.core.errors import FatalBackendError


class Pooling(StrEnum):
    CLS = "cls"
    MEAN = "mean"
    LAST_TOKEN = "last-token"


# sentence-transformers' mode names (its ``Pooling.pooling_mode``) for the ones served.
_MODES = {"cls": Pooling.CLS, "mean": Pooling.MEAN, "lasttoken": Pooling.LAST_TOKEN}

# Its older config keys, one flag per mode, in the order it concatenates them
# (``_LEGACY_POOLING_MODE_KWARGS`` in sentence_transformers/.../pooling.py).
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

_SERVED_MODULES = ("Transformer", "Pooling", "Normalize")


def read_modules(path: Path, model_id: str) -> list[dict[str, Any]]:
    """``modules.json``'s entries (``[]`` without one), refused when one is not served."""
    modules = read_list(path / "modules.json")
    unsupported = [
        str(m.get("type")) for m in modules if not str(m.get("type", "")).endswith(_SERVED_MODULES)
    ]
    if unsupported:
        raise FatalBackendError(
            f"{model_id}: unsupported sentence-transformers modules {unsupported}"
        )
    return modules


def normalizes(modules: list[dict[str, Any]]) -> bool:
    return any(str(m.get("type", "")).endswith("Normalize") for m in modules)


def _module_dir(path: Path, module: dict[str, Any]) -> Path:
    rel = module.get("path", "")
    root = path.resolve()
    # Checked by its name (no ``..`` out, not absolute), not where it leads: a module folder
    # the operator linked in from elsewhere is theirs to serve.
    folder = Path(os.path.normpath(root / rel)) if isinstance(rel, str) else None
    if folder is None or not folder.is_relative_to(root):
        raise FatalBackendError(
            f"{path / 'modules.json'}: module path {rel!r} is not a folder of the model directory"
        )
    return folder


def _pooling_module(modules: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``Pooling`` module, the first one (the one ``read_pooling`` reads)."""
    return next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)


def pooling_config_name(modules: list[dict[str, Any]]) -> str | None:
    """The ``Pooling`` module's config as a hub repo names it (``2_Pooling/config.json``), or
    None: no such module, or a path out of the directory (``..``, absolute), which
    ``read_pooling`` refuses, naming it."""
    module = _pooling_module(modules)
    rel = module.get("path", "") if module is not None else None
    if not isinstance(rel, str) or posixpath.isabs(rel):
        return None
    name = posixpath.normpath(posixpath.join(rel, "config.json"))
    return None if name.startswith("../") else name


def _modes(cfg: dict[str, Any], file: Path) -> list[str]:
    """The modes a pooling config names, as sentence-transformers reads it: ``pooling_mode``
    (a name or a list), else the older flags; neither means mean."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        return [name for key, name in _LEGACY_MODES.items() if cfg.get(key)] or ["mean"]
    modes = [mode] if isinstance(mode, str) else mode
    if not isinstance(modes, list) or not modes or not all(isinstance(m, str) for m in modes):
        raise FatalBackendError(f"{file}: pooling_mode must be a mode name or a list of them")
    return modes


def read_pooling(
    path: Path, modules: list[dict[str, Any]], override: Pooling | None = None
) -> Pooling | None:
    """The pooling that the model's ``Pooling`` module does (None: it has none).

    ``override`` (``--pooling``) replaces its mode, whatever the file names; the file must
    still be readable, and ``include_prompt: false`` is refused either way.
    """
    module = _pooling_module(modules)
    if module is None:
        return override
    file = _module_dir(path, module) / "config.json"
    cfg = read_object(file, required=True)
    modes = _modes(cfg, file)
    if not get_bool(cfg, "include_prompt", True, file):
        raise FatalBackendError(
            f"{file}: include_prompt: false (prompt tokens left out of the pooling) is not "
            "supported: embedplex pools every token, prompt included"
        )
    if override is not None:
        return override
    if len(modes) > 1:
        raise FatalBackendError(
            f"{file}: pooling modes {modes} are concatenated into one vector by "
            "sentence-transformers; embedplex pools with one mode (cls, mean or lasttoken): "
            "--pooling serves one of them, if its vectors alone are what you want"
        )
    if modes[0] not in _MODES:
        raise FatalBackendError(
            f"{file}: pooling mode {modes[0]!r} is not supported (cls, mean, lasttoken)"
        )
    return _MODES[modes[0]]
