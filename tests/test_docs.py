"""The documentation stays true: every setting is documented, the quickstart is two commands."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from embedplex.cli.main import _is_table_list
from embedplex.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    hints = typing.get_type_hints(Settings)
    for name in Settings.model_fields:
        if not _is_table_list(hints[name]):  # tables ([[providers]]) have no flag
            assert f"`--{name.replace('_', '-')}`" in text, name
        assert f"`EMBEDPLEX_{name.upper()}`" in text, name


def test_quickstart_is_make_serve_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [re.sub(r"\s+#.*", "", line).strip() for line in quickstart.strip().splitlines()]
    assert commands == ["make serve", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
