"""The documentation stays true: every setting is documented, the quickstart is two commands."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from embedplex.cli.main import _is_table_list
from embedplex.config import Settings
from embedplex.config_env import UnknownEnvNames, check_env_names

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    hints = typing.get_type_hints(Settings)
    for name in Settings.model_fields:
        if not _is_table_list(hints[name]):  # tables ([[providers]]) have no flag
            assert f"`--{name.replace('_', '-')}`" in text, name
        assert f"`EMBEDPLEX_{name.upper()}`" in text, name


# The names docs/configuration.md shows being refused (typos, nested keys, service links).
REFUSED_EXAMPLES = {
    "EMBEDPLEX_APIKEY",
    "EMBEDPLEX_STATE_URI",
    "EMBEDPLEX_METRIC_PORT",
    "EMBEDPLEX_API_KEYS__0__WEIGHT",
    "EMBEDPLEX_SERVICE_HOST",
}


def test_every_embedplex_variable_the_docs_name_is_accepted() -> None:
    """A documented name that ``Settings.load`` refused would stop whoever copies it; the
    examples of refused names are refused."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages += sorted((ROOT / "examples").glob("*.py"))
    pattern = r"\bEMBEDPLEX_[A-Z0-9_]*[A-Z0-9]"
    names = {name for page in pages for name in re.findall(pattern, page.read_text())}
    assert {"EMBEDPLEX_CONFIG", "EMBEDPLEX_SERVER", "EMBEDPLEX_API_KEY"} <= names
    assert names >= REFUSED_EXAMPLES
    check_env_names(dict.fromkeys(names - REFUSED_EXAMPLES, ""), Settings.model_fields)
    for name in REFUSED_EXAMPLES:
        with pytest.raises(UnknownEnvNames):
            check_env_names({name: ""}, Settings.model_fields)


def test_quickstart_is_make_serve_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [re.sub(r"\s+#.*", "", line).strip() for line in quickstart.strip().splitlines()]
    assert commands == ["make serve", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
