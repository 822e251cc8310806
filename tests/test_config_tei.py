"""TEI's own environment variables are refused or warned about at ``serve``, never ignored.

The review's reproduction: ``API_KEY=secret MODEL_ID=BAAI/bge-small-en-v1.5 embedplex serve``
served the default model with no authentication and said nothing (TEI reads every flag from a
variable of the same name; embedplex reads ``EMBEDPLEX_*`` alone).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from embedplex.cli.main import app
from embedplex.config import Settings
from helpers import serve_refused

runner = CliRunner()

SECRET = "tei-style-secret-0123456789"
OTHER_MODEL = "BAAI/bge-small-en-v1.5"
TEI_NAMES = [
    "API_KEY",
    "MODEL_ID",
    "POOLING",
    "DEFAULT_PROMPT",
    "DEFAULT_PROMPT_NAME",
    "REVISION",
    "DTYPE",
    "SERVED_MODEL_NAME",
    "TOKENIZATION_WORKERS",
    "MAX_CONCURRENT_REQUESTS",
    "MAX_BATCH_TOKENS",
    "MAX_BATCH_REQUESTS",
    "MAX_CLIENT_BATCH_SIZE",
    "AUTO_TRUNCATE",
    "PAYLOAD_LIMIT",
    "JSON_OUTPUT",
    "DISABLE_SPANS",
    "OTLP_ENDPOINT",
    "OTLP_SERVICE_NAME",
    "PROMETHEUS_PORT",
    "CORS_ALLOW_ORIGIN",
    "HF_API_TOKEN",
    "DENSE_PATH",
]


def test_the_reviewers_tei_environment_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    # Offline: the old code went on to load the other model, and must fail fast doing so.
    env = {"API_KEY": SECRET, "MODEL_ID": OTHER_MODEL, "HF_HUB_OFFLINE": "1"}
    done = serve_refused(env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # one line, nothing logged before it
    (line,) = lines
    assert line.startswith("embedplex: API_KEY, MODEL_ID are TEI's variables"), line
    assert "for API_KEY, set EMBEDPLEX_API_KEY" in line
    assert "for MODEL_ID, set EMBEDPLEX_MODEL_ID" in line
    assert "EMBEDPLEX_IGNORE_TEI_ENV" in line
    assert SECRET not in done.stdout + done.stderr
    assert OTHER_MODEL not in done.stdout + done.stderr
    assert not list(tmp_path.iterdir())  # no state store was opened


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """``serve`` up to the point it would listen: the settings it would serve, one per start.
    Logging stays pytest's (caplog sees the warnings)."""
    for name in TEI_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.upper().startswith("EMBEDPLEX_")]:
        monkeypatch.delenv(name)
    runs: list[Settings] = []
    monkeypatch.setattr("embedplex.serve.server.serve", runs.append)
    monkeypatch.setattr("embedplex.observability.logs.setup_logging", lambda *a, **k: None)
    return runs


def serve(env: dict[str, str], *flags: str) -> Any:
    return runner.invoke(app, ["serve", *flags], env=env)


@pytest.mark.parametrize(
    ("name", "value", "counterpart"),
    [
        ("API_KEY", SECRET, "EMBEDPLEX_API_KEY"),
        ("MODEL_ID", OTHER_MODEL, "EMBEDPLEX_MODEL_ID"),
        ("POOLING", "cls", "EMBEDPLEX_POOLING"),
        ("DEFAULT_PROMPT", "query-prefix-xyz: ", "EMBEDPLEX_DEFAULT_PROMPT"),
        ("DEFAULT_PROMPT_NAME", "query-name-xyz", "EMBEDPLEX_DEFAULT_PROMPT_NAME"),
    ],
)
def test_a_name_that_changes_what_is_served_is_refused(
    started: list[Settings], name: str, value: str, counterpart: str
) -> None:
    result = serve({name: value})
    assert result.exit_code == 2, result.output
    assert started == []
    assert f"{name} is TEI's variable" in result.output
    assert f"set {counterpart} (docs/configuration.md" in result.output
    assert value.strip() not in result.output


def test_the_counterpart_or_the_flag_or_the_ignore_list_lets_it_start(
    started: list[Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    tei = {"API_KEY": SECRET, "MODEL_ID": OTHER_MODEL}
    # The counterpart set, even to the default: the operator has said what to serve.
    default_model = Settings.model_fields["model_id"].default
    counterparts = {"EMBEDPLEX_API_KEY": "an-embedplex-key-0123456789"}
    counterparts |= {"EMBEDPLEX_MODEL_ID": default_model}
    assert serve(tei | counterparts).exit_code == 0
    assert started[-1].model_id == default_model
    # The flags, for both.
    flags = ("--api-key", "an-embedplex-key-0123456789", "--model-id", default_model)
    assert serve(tei, *flags).exit_code == 0
    # Variables of another program: listed, they neither stop the start nor warn.
    assert serve(tei | {"EMBEDPLEX_IGNORE_TEI_ENV": "API_KEY,MODEL_ID"}).exit_code == 0
    assert started[-1].api_key is None
    # Empty values (compose placeholders) are unset.
    assert serve({"API_KEY": "", "MODEL_ID": " "}).exit_code == 0
    assert len(started) == 4
    assert not [r for r in caplog.records if "TEI" in r.getMessage()]


def test_the_other_names_start_with_a_warning_each_naming_what_to_set(
    started: list[Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    env = {
        "MAX_CLIENT_BATCH_SIZE": "64",
        "JSON_OUTPUT": "true",
        "OTLP_ENDPOINT": "http://collector-xyz:4317",
        "HF_API_TOKEN": "hf_secretvalue123",
        "CORS_ALLOW_ORIGIN": "https://origin-xyz.example",
        # Set by Docker and most platforms, never TEI's alone: not looked at.
        "HOSTNAME": "container-xyz",
        "PORT": "3000",
        # A Kubernetes service link (a service named prometheus), not TEI's metrics port.
        "PROMETHEUS_PORT": "tcp://10.96.0.17:9090",
    }
    result = serve(env)
    assert result.exit_code == 0, result.output
    assert len(started) == 1
    warnings = sorted(r.getMessage() for r in caplog.records if r.name == "embedplex.config")
    assert len(warnings) == 5, warnings
    expected = [
        "CORS_ALLOW_ORIGIN is TEI's variable, which embedplex does not read: set "
        "EMBEDPLEX_CORS_ALLOW_ORIGINS",
        "HF_API_TOKEN is TEI's variable, which embedplex does not read: set HF_TOKEN",
        "JSON_OUTPUT is TEI's variable, which embedplex does not read: set "
        "EMBEDPLEX_LOG_FORMAT=json",
        "MAX_CLIENT_BATCH_SIZE is TEI's variable, which embedplex does not read: set "
        "EMBEDPLEX_MAX_CLIENT_BATCH_SIZE",
        "OTLP_ENDPOINT is TEI's variable, which embedplex does not read: set "
        "EMBEDPLEX_OTLP_ENDPOINT",
    ]
    for warning, start in zip(warnings, expected, strict=True):
        assert warning.startswith(start), warning
        assert warning.endswith("(or list it in EMBEDPLEX_IGNORE_TEI_ENV)")
    text = " ".join(warnings) + result.output
    for value in env.values():
        assert value not in text


def test_the_ignore_list_names_tei_variables_only(started: list[Settings]) -> None:
    result = serve({"EMBEDPLEX_IGNORE_TEI_ENV": "API_KEY,HOSTNAME"})
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", "").split())  # rich wraps its box
    assert "ignore_tei_env: HOSTNAME is no TEI variable embedplex checks" in text
    assert Settings(ignore_tei_env='["API_KEY", "DTYPE"]').ignore_tei_env == ["API_KEY", "DTYPE"]


def test_tei_advice_follows_the_value(
    started: list[Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """TEI's --json-output is a flag: JSON_OUTPUT=false asks for embedplex's default, and was
    told to set EMBEDPLEX_LOG_FORMAT=json. A *_PORT that is a number is TEI's."""
    caplog.set_level(logging.WARNING)
    for value, advice in [("false", "=pretty"), ("true", "=json"), ("0", "=pretty")]:
        caplog.clear()
        assert serve({"JSON_OUTPUT": value}).exit_code == 0
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "embedplex.config"]
        assert f"set EMBEDPLEX_LOG_FORMAT{advice} (or list it" in warning
    caplog.clear()
    assert serve({"PROMETHEUS_PORT": "9000"}).exit_code == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "embedplex.config"]
    assert warning.startswith("PROMETHEUS_PORT is TEI's variable")
    assert "set EMBEDPLEX_METRICS_PORT only to move /metrics" in warning


MODELS_TOML = """
api_key = "an-embedplex-key-0123456789"

[[models]]
name = "minilm"
model_id = "sentence-transformers/all-MiniLM-L6-v2"
"""


def test_what_the_config_file_says_counts(
    started: list[Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's reproduction: ``API_KEY=other MODEL_ID=x embedplex serve --config m.toml``
    with api_key and a [[models]] table in the file was refused, and the advice it gave
    (EMBEDPLEX_MODEL_ID) was refused again beside [[models]]."""
    caplog.set_level(logging.WARNING)
    config = tmp_path / "m.toml"
    config.write_text(MODELS_TOML)
    tei = {"API_KEY": SECRET, "MODEL_ID": OTHER_MODEL}
    result = serve(tei | {"REVISION": "v2", "MAX_BATCH_TOKENS": "4096"}, "--config", str(config))
    assert result.exit_code == 0, result.output
    assert [m.model_id for m in started[-1].local_models()] == [
        "sentence-transformers/all-MiniLM-L6-v2"
    ]
    # Every table says its model id; REVISION is a table's key, never EMBEDPLEX_REVISION
    # beside tables; MAX_BATCH_TOKENS either.
    warnings = sorted(r.getMessage() for r in caplog.records if r.name == "embedplex.config")
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(
        "MAX_BATCH_TOKENS is TEI's variable, which embedplex does not read: set "
        "max_batch_tokens in each [[models]] table, or EMBEDPLEX_MAX_BATCH_TOKENS for them all"
    )
    assert warnings[1].startswith(
        "REVISION is TEI's variable, which embedplex does not read: set revision in each "
        "[[models]] table (or list it"
    )
    # Top-level keys in the file count as their variables do.
    flat = tmp_path / "flat.toml"
    flat.write_text('model_id = "sentence-transformers/all-MiniLM-L6-v2"\npooling = "mean"\n')
    assert serve({"MODEL_ID": OTHER_MODEL, "POOLING": "cls"}, "-c", str(flat)).exit_code == 0


def test_a_models_table_that_leaves_it_unsaid_is_refused_naming_the_table_key(
    started: list[Settings], tmp_path: Path
) -> None:
    config = tmp_path / "m.toml"
    config.write_text(
        MODELS_TOML + 'pooling = "cls"\n\n[[models]]\nname = "bge"\nmodel_id = "BAAI/bge"\n'
    )
    result = serve({"API_KEY": SECRET, "POOLING": "cls"}, "-c", str(config))
    assert result.exit_code == 2
    assert started == []
    text = " ".join(result.output.split())
    assert text.startswith("embedplex: POOLING is TEI's variable")
    assert "for POOLING, set pooling in each [[models]] table, or EMBEDPLEX_POOLING" in text
    # Each table saying it, or the top level for all of them, lets it start.
    assert serve({"POOLING": "cls", "EMBEDPLEX_POOLING": "cls"}, "-c", str(config)).exit_code == 0
    config.write_text(config.read_text() + 'pooling = "mean"\n')
    assert serve({"POOLING": "cls"}, "-c", str(config)).exit_code == 0
    # One of the two prompts in each table is the prompt's one choice.
    config.write_text(
        MODELS_TOML + 'default_prompt_name = "query"\n\n'
        '[[models]]\nname = "bge"\nmodel_id = "BAAI/bge"\ndefault_prompt = "q: "\n'
    )
    assert serve({"DEFAULT_PROMPT": "query: "}, "-c", str(config)).exit_code == 0
    assert len(started) == 3


@pytest.mark.parametrize(
    "auth",
    [
        '[[api_keys]]\nid = "team-a"\nkey = "a-static-key-0123456789"\n',
        "require_api_key = true\n",
        'state_url = "sqlite:///{tmp}/state.db"\n',
    ],
)
def test_api_keys_or_managed_keys_say_what_api_key_would(
    started: list[Settings], tmp_path: Path, auth: str
) -> None:
    config = tmp_path / "auth.toml"
    config.write_text(auth.format(tmp=tmp_path))
    result = serve({"API_KEY": SECRET}, "-c", str(config))
    assert result.exit_code == 0, result.output
    assert len(started) == 1


# TEI's spelling of three text-embeddings-router flags starts ``embedplex serve`` too:
# --hostname (our --host), -p (--port) and the switch --json-output (--log-format json). Only the
# flags: TEI's HOSTNAME and PORT variables stay unread.


def test_a_tei_command_line_starts_with_the_same_meaning(started: list[Settings]) -> None:
    result = runner.invoke(app, ["serve", "--hostname", "0.0.0.0", "-p", "3000", "--json-output"])
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert (settings.host, settings.port, settings.log_format) == ("0.0.0.0", 3000, "json")
    # Said on the command line: TEI's JSON_OUTPUT variable is then no news (config_tei.py).
    assert "log_format" in settings.model_fields_set


def test_config_show_takes_them_as_serve_does() -> None:
    result = runner.invoke(app, ["config", "show", "--hostname", "::", "-p", "1", "--json-output"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown["host"], shown["port"], shown["log_format"]) == ("::", 1, "json")


def test_without_them_nothing_changes_and_tei_variables_stay_unread() -> None:
    env = {"HOSTNAME": "10.1.2.3", "PORT": "3000", "JSON_OUTPUT": "true"}
    shown = json.loads(runner.invoke(app, ["config", "show"], env=env).output)
    assert (shown["host"], shown["port"], shown["log_format"]) == ("127.0.0.1", 8080, "pretty")


def test_json_output_beside_another_log_format_is_refused() -> None:
    result = runner.invoke(app, ["config", "show", "--json-output", "--log-format", "pretty"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", "").split())
    assert "--json-output is --log-format json, and --log-format pretty was given too" in text
    agreed = runner.invoke(app, ["config", "show", "--json-output", "--log-format", "json"])
    assert agreed.exit_code == 0 and json.loads(agreed.output)["log_format"] == "json"


def test_help_lists_them_beside_ours() -> None:
    text = runner.invoke(app, ["serve", "-h"], env={"COLUMNS": "300"}).output
    rows = [line for line in text.splitlines() if line.startswith("│ --")]
    assert any("--host,--hostname" in row for row in rows), rows
    assert any(row.split()[1:3] == ["--port", "-p"] for row in rows), rows
    (json_row,) = [row for row in rows if "--json-output" in row]
    assert "--log-format json" in json_row


def test_teis_cors_flag_is_ours_and_its_prometheus_port_is_ignored_as_tei_ignores_it(
    started: list[Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """TEI's --cors-allow-origin (one origin a flag, "*" for any) means our
    --cors-allow-origins. Its --prometheus-port does nothing in TEI's HTTP server (metrics stay
    on the main port; its gRPC build alone listens there): taken and ignored with a warning,
    never our --metrics-port, which would take /metrics off the main port."""
    caplog.set_level(logging.WARNING)
    flags = ["--cors-allow-origin", "https://a.example", "--cors-allow-origin", "*"]
    result = serve({}, *flags, "--prometheus-port", "9001")
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert settings.cors_allow_origins == ["https://a.example", "*"]
    assert settings.metrics_port is None
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "embedplex.config"]
    assert warning.startswith("--prometheus-port is ignored, as TEI's HTTP server ignores it")
    assert serve({}, "--prometheus-port", "65536").exit_code == 2  # a port, as TEI's u16
    shown = runner.invoke(app, ["config", "show", "--cors-allow-origin", "*", *flags[:2]])
    assert json.loads(shown.output)["cors_allow_origins"] == ["*", "https://a.example"]
    text = runner.invoke(app, ["serve", "-h"], env={"COLUMNS": "300"}).output
    assert "--cors-allow-origins,--cors-allow-origin" in text
