"""A config file's mistakes are one line each, naming the file and the place, exit status 2.

Before: a misspelt key was pydantic's "Extra inputs are not permitted" in a usage box, with no
hint of the name meant; a TOML syntax error named no file, and quoted the character it stopped
at (which may sit inside a secret).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from embedplex.cli.main import app
from embedplex.config import Settings
from embedplex.config_file import ConfigFileError

runner = CliRunner()


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """What ``serve`` went on to serve: nothing, when the file is refused first."""
    monkeypatch.setattr("embedplex.serve.server.serve", (runs := []).append)
    return runs


def refused(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Exit 2, no traceback, no usage box: the lines printed, each ``embedplex: ...``."""
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "Usage:" not in result.output
    lines = result.output.strip().splitlines()
    assert all(line.startswith("embedplex: ") for line in lines), lines
    return [line.removeprefix("embedplex: ") for line in lines]


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "app.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("command", [["serve"], ["config", "show"], ["keys", "list"]])
def test_a_misspelt_top_level_key_gets_the_name_meant(
    command: list[str], tmp_path: Path, started: list[Settings]
) -> None:
    path = write(tmp_path, "port = 9000\nmax_batch_token = 4096\n")
    assert refused([*command, "--config", str(path)]) == [
        f"unknown setting 'max_batch_token' in {path}; did you mean 'max_batch_tokens'?"
    ]
    assert started == []


TABLES = """
[[providers]]
name = "voyage"
type = "voyage"
model = "voyage-3"
api_key_env = "VOYAGE_API_KEY"

[[providers]]
name = "local-tei"
type = "tei"
endpont = "http://127.0.0.1:3000"

[[routes]]
model = "code"
provider = ["voyage"]

[[models]]
name = "minilm"
model_id = "sentence-transformers/all-MiniLM-L6-v2"
max_batch_token = 4096

[[api_keys]]
id = "nightly"
key = "a-static-key-0123456789"
wieght = 2
"""


def test_a_key_in_a_table_names_the_table_and_the_key_meant(
    tmp_path: Path, started: list[Settings]
) -> None:
    path = write(tmp_path, TABLES)
    assert refused(["serve", "-c", str(path)]) == [  # in the settings' order
        f"unknown setting 'max_batch_token' in [[models]] table 1 of {path}; did you mean "
        "'max_batch_tokens'?",
        f"unknown setting 'endpont' in [[providers]] table 2 of {path}; did you mean 'endpoint'?",
        f"unknown setting 'provider' in [[routes]] table 1 of {path}; did you mean 'providers'?",
        f"unknown setting 'wieght' in [[api_keys]] table 1 of {path}; did you mean 'weight'?",
    ]
    assert started == []


def test_a_top_level_key_written_below_a_table_is_told_where_it_belongs(tmp_path: Path) -> None:
    """TOML puts it in the table: the usual way to meet this error, with nothing close."""
    path = write(tmp_path, '[[models]]\nname = "a"\nmodel_id = "m"\n\nport = 9000\n')
    (line,) = refused(["config", "show", "-c", str(path)])
    assert line.startswith(f"unknown setting 'port' in [[models]] table 1 of {path}: port is a ")
    assert "move it above the first [[table]]" in line


def test_a_tables_own_key_comes_before_a_top_level_setting_of_that_name(tmp_path: Path) -> None:
    """``api_key`` in a provider's table is its ``api_key_env``: "move it above the first
    [[table]]" would make the upstream's key every client's key for this server."""
    path = write(
        tmp_path,
        '[[providers]]\nname = "x"\ntype = "openai"\nmodel = "m"\napi_key = "sk-upstream-1"\n'
        '[[providers]]\nname = "t"\ntype = "tei"\nmodel_id = "BAAI/bge"\n'
        '[[api_keys]]\nid = "ci"\napi_key = "a-static-key-0123456789"\n',
    )
    lines = refused(["config", "show", "-c", str(path)])
    assert lines[:2] == [
        f"unknown setting 'api_key' in [[providers]] table 1 of {path}; did you mean "
        "'api_key_env'? (the name of the environment variable that holds the value, never the "
        "value)",
        f"unknown setting 'model_id' in [[providers]] table 2 of {path}; did you mean 'model'?",
    ]
    assert lines[2].startswith(f"unknown setting 'api_key' in [[api_keys]] table 1 of {path}")
    assert not any("top-level" in line or "sk-upstream" in line for line in lines)


def test_a_top_level_key_in_a_table_from_the_environment_names_its_variable() -> None:
    env = {"EMBEDPLEX_MODELS": '[{"name": "a", "model_id": "m", "port": 9000}]'}
    assert refused(["config", "show"], env) == [
        "unknown setting 'port' in [[models]] table 1 of EMBEDPLEX_MODELS: port is a top-level "
        "setting (EMBEDPLEX_PORT), not a table's"
    ]


def test_a_nested_table_and_a_key_with_nothing_close(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[models]]\nname = "a"\nmodel_id = "m"\nruntime = "ray"\n'
        "[models.autoscaling]\nmax_replica = 3\nzzz = 1\n",
    )
    assert refused(["config", "show", "-c", str(path)]) == [
        f"unknown setting 'max_replica' in autoscaling of [[models]] table 1 of {path}; did "
        "you mean 'max_replicas'?",
        f"unknown setting 'zzz' in autoscaling of [[models]] table 1 of {path}",
    ]


def test_a_table_from_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 9000\n")
    env = {"EMBEDPLEX_PROVIDERS": '[{"name": "p", "type": "tei", "endpont": "http://h"}]'}
    assert refused(["config", "show", "-c", str(path)], env) == [
        "unknown setting 'endpont' in [[providers]] table 1 of EMBEDPLEX_PROVIDERS; did you "
        "mean 'endpoint'?"
    ]


def test_other_mistakes_beside_no_unknown_key_stay_as_they_were(tmp_path: Path) -> None:
    path = write(tmp_path, "port = -1\n")
    with pytest.raises(ValueError, match="port") as caught:
        Settings.load(path)
    assert not isinstance(caught.value, ConfigFileError)


SECRET = "sk-very-secret-value"


@pytest.mark.parametrize(
    ("text", "reason", "where"),
    [
        # An unterminated string: tomllib quotes the character it stopped at ('\n').
        (f'port = 1\napi_key = "{SECRET}\n', "illegal character", "line 2, column 32"),
        (f"api_key = {SECRET}\n", "invalid value", "line 1, column 11"),
        (f'api_key = "{SECRET}\x07x"\n', "illegal character", "line 1, column 32"),
        ('api_key = """abc\x01"""\n', "illegal character", "line 1, column 17"),
        ("port = 1\nport = 2\n", "cannot overwrite a value", "line 2, column 9"),
        ("[[models]\n", "expected ']]' at the end of an array declaration", "line 1, column 9"),
        ('api_key = "abc', "unterminated string", "at the end of the file"),
    ],
)
def test_a_toml_syntax_error_names_the_file_and_place_and_quotes_nothing(
    text: str, reason: str, where: str, tmp_path: Path
) -> None:
    path = write(tmp_path, text)
    (line,) = refused(["serve", "--config", str(path)])
    assert line == f"{path} is not valid TOML: {reason} ({where})"
    assert "'" not in line.split(": ", 1)[1].replace("']]'", "")  # no character quoted


def test_a_file_that_is_no_utf8_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, b'port = 1\napi_key = "\xff\xfe-secret"\n')
    assert refused(["config", "show", "-c", str(path)]) == [
        f"{path} is not valid TOML: not UTF-8 text (line 2)"
    ]


def test_the_file_named_by_embedplex_config_is_named_too(tmp_path: Path) -> None:
    path = write(tmp_path, "prot = 1\n")
    assert refused(["config", "show"], {"EMBEDPLEX_CONFIG": str(path)}) == [
        f"unknown setting 'prot' in {path}; did you mean 'port'?"
    ]


def test_settings_load_raises_it_for_every_caller(tmp_path: Path) -> None:
    """``Settings.load`` itself (Ray's application builder, the bench) gets the same lines."""
    path = write(tmp_path, "max_batch_token = 1\nprot = 2\n")
    with pytest.raises(ConfigFileError) as caught:
        Settings.load(path)
    lines: Any = caught.value.lines
    assert len(lines) == 2 and str(caught.value) == "\n".join(lines)
    assert isinstance(caught.value, ValueError)
