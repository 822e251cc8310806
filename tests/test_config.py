"""Configuration: precedence, validation, redaction, and the CLI that reads it."""

from __future__ import annotations

import json
import tomllib
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedplex.cli.main import _is_table_list, app, default_toml
from embedplex.config import Settings

runner = CliRunner()


def test_defaults() -> None:
    s = Settings.load()
    assert (s.host, s.port, s.backend, s.dtype) == ("127.0.0.1", 8080, "onnx", "float32")
    assert s.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert s.model_name == s.model_id


def test_precedence_defaults_toml_env_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "c.toml"
    file.write_text(
        'port = 7000\nmax_batch_tokens = 4096\nlog_format = "json"\nserved_model_name = "toml"\n'
    )
    monkeypatch.setenv("EMBEDPLEX_PORT", "7100")
    monkeypatch.setenv("EMBEDPLEX_SERVED_MODEL_NAME", "env")
    s = Settings.load(file, served_model_name="flag")
    assert s.max_batch_tokens == 4096  # file over default
    assert s.log_format == "json"
    assert s.port == 7100  # env over file
    assert s.served_model_name == "flag"  # flag over env


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "c.toml"
    file.write_text("port = 7001\n")
    monkeypatch.setenv("EMBEDPLEX_CONFIG", str(file))
    assert Settings.load().port == 7001


def test_unknown_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        Settings.load(file)
    with pytest.raises(ValueError, match="dtype"):
        Settings.load(dtype="int4")
    with pytest.raises(ValueError, match="max_client_batch_size"):
        Settings.load(max_client_batch_size=10, max_queue_size=5)
    with pytest.raises(FileNotFoundError):
        Settings.load(tmp_path / "missing.toml")


def test_list_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDPLEX_CORS_ALLOW_ORIGINS", '["https://a.example", "https://b.example"]')
    assert Settings.load().cors_allow_origins == ["https://a.example", "https://b.example"]
    assert Settings.load(
        cors_allow_origins="https://c.example, https://d.example"
    ).cors_allow_origins == [
        "https://c.example",
        "https://d.example",
    ]


# Every list setting that is no table, with values it accepts.
LISTS = {
    "cors_allow_origins": ["https://a.example", "https://b.example"],
    "ignore_tei_env": ["API_KEY", "DTYPE"],
    "provider_key_envs": ["VOYAGE_API_KEY", "COHERE_API_KEY"],
    "provider_allowed_networks": ["10.0.0.0/8", "192.168.1.0/24"],
    "allowed_embedding_models": ["minilm", "bge-*"],
    "allowed_rerank_models": ["[ab]-rerank", "*"],  # "[" opens a pattern, not JSON
}


def test_every_list_setting_is_covered() -> None:
    hints = typing.get_type_hints(Settings)
    lists = {
        name
        for name in Settings.model_fields
        if "list[" in str(hints[name]) and not _is_table_list(hints[name])
    }
    assert lists == set(LISTS)


def test_every_list_setting_takes_commas_or_json_from_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EMBEDPLEX_CORS_ALLOW_ORIGINS=https://a.example failed with pydantic's "error parsing
    value" while the allowed lists took "a,b": every list takes both forms now."""
    for name, values in LISTS.items():
        env = f"EMBEDPLEX_{name.upper()}"
        monkeypatch.setenv(env, ", ".join(values))
        assert getattr(Settings.load(), name) == values, name
        monkeypatch.setenv(env, values[0])
        assert getattr(Settings.load(), name) == values[:1], name
        monkeypatch.setenv(env, json.dumps(values))
        assert getattr(Settings.load(), name) == values, name
        monkeypatch.delenv(env)


def test_a_repeated_list_flag_keeps_every_value() -> None:
    result = runner.invoke(
        app,
        [
            "config",
            "show",
            "--cors-allow-origins",
            "https://a.example",
            "--cors-allow-origins",
            "https://b.example,https://c.example",
            "--allowed-embedding-models",
            '["minilm"]',
        ],
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["cors_allow_origins"] == [f"https://{x}.example" for x in "abc"]
    assert shown["allowed_embedding_models"] == ["minilm"]


def test_help_takes_h_and_shows_the_settings_defaults_but_no_secrets() -> None:
    short = runner.invoke(app, ["serve", "-h"], env={"COLUMNS": "300"})
    assert short.exit_code == 0, short.output
    assert short.output == runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "300"}).output
    rows = {
        line.split()[1]: line
        for line in short.output.splitlines()
        if line.startswith("│ --") and len(line.split()) > 1
    }
    assert "HTTP port. [default: 8080]" in rows["--port"]
    assert "[default: sentence-transformers/all-MiniLM-L6-v2]" in rows["--model-id"]
    assert "[default: true]" in rows["--auto-truncate"]
    assert "[default: fair]" in rows["--queue-policy"]
    # Secrets, and settings whose default is none, show no default.
    for flag in ("--api-key", "--admin-secret", "--redis-url", "--served-model-name"):
        assert "[default" not in rows[flag], rows[flag]
    assert runner.invoke(app, ["-h"]).exit_code == 0
    assert runner.invoke(app, ["config", "show", "-h"]).exit_code == 0


def test_default_prompt_and_its_name_are_one_choice() -> None:
    """TEI refuses the pair (conflicts_with); here the name was dropped in silence."""
    with pytest.raises(ValueError, match="default_prompt and default_prompt_name are one choice"):
        Settings.load(default_prompt="query: ", default_prompt_name="query")
    result = runner.invoke(
        app, ["serve", "--default-prompt", "query: ", "--default-prompt-name", "query"]
    )
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", "").split())
    assert "default_prompt and default_prompt_name are one choice (as in TEI): give one" in text


def test_secrets_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDPLEX_API_KEY", "hunter2")
    s = Settings.load()
    assert s.api_key is not None and s.api_key.get_secret_value() == "hunter2"
    assert s.redacted()["api_key"] == "***"
    assert "hunter2" not in repr(s)
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0
    assert "hunter2" not in result.output
    assert json.loads(result.output)["api_key"] == "***"


def test_config_show_takes_every_setting_as_a_flag(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("port = 7002\n")
    result = runner.invoke(
        app,
        [
            "config",
            "show",
            "--config",
            str(file),
            "--max-batch-tokens",
            "512",
            "--dtype",
            "int8",
            "--auto-truncate",
            "--pooling",
            "cls",
            "--api-key",
            "k",
            "--cache-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["port"] == 7002
    assert shown["max_batch_tokens"] == 512
    assert shown["dtype"] == "int8"
    assert shown["auto_truncate"] is True
    assert shown["pooling"] == "cls"
    assert shown["api_key"] == "***"
    flags = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "300"}).output
    hints = typing.get_type_hints(Settings)
    for name in Settings.model_fields:
        if _is_table_list(hints[name]):  # [[providers]], [[routes]]: TOML tables, not flags
            assert "--" + name.replace("_", "-") not in flags
        else:
            assert "--" + name.replace("_", "-") in flags


def test_config_show_rejects_bad_values() -> None:
    result = runner.invoke(app, ["config", "show", "--dtype", "int4"])
    assert result.exit_code != 0
    result = runner.invoke(app, ["config", "show", "--port", "99999"])
    assert result.exit_code != 0
    assert "port" in result.output


def test_config_init_writes_a_commented_default_file(tmp_path: Path) -> None:
    path = tmp_path / "embedplex.toml"
    result = runner.invoke(app, ["config", "init", str(path)])
    assert result.exit_code == 0
    text = path.read_text()
    assert text == default_toml()
    hints = typing.get_type_hints(Settings)
    tables = {name for name in Settings.model_fields if _is_table_list(hints[name])}
    for name in Settings.model_fields:
        assert (f"# [[{name}]]" if name in tables else f"# {name} =") in text
    # Uncommenting every top-level line with a value gives a valid file equal to the defaults.
    active = "\n".join(
        line[2:]
        for line in text.splitlines()
        if line.startswith("# ")
        and " = " in line
        and not line.endswith("=")
        and line[2:].split(" = ")[0] in set(Settings.model_fields) - tables
    )
    values = tomllib.loads(active)
    assert len(values) > 20
    assert Settings.load().model_dump(mode="json") | values == Settings.load().model_dump(
        mode="json"
    )
    again = runner.invoke(app, ["config", "init", str(path)])
    assert again.exit_code != 0


def test_inference_layout_defaults() -> None:
    from embedplex.models.layout import InferenceLayout, inference_layout

    # ONNX on a CPU: two streams of half the cores each, and a pass alone on every core; one
    # core: one stream.
    assert inference_layout(Settings(), cores=2) == InferenceLayout(2, 1, 2)
    assert inference_layout(Settings(), cores=8) == InferenceLayout(2, 4, 8)
    assert inference_layout(Settings(), cores=1) == InferenceLayout(1, 1)
    # torch (global thread pool) and explicit settings keep what they say.
    assert inference_layout(Settings(backend="torch"), cores=8) == InferenceLayout(1, 8)
    assert inference_layout(Settings(inference_streams=1), cores=2) == InferenceLayout(1, 2)
    assert inference_layout(
        Settings(inference_streams=3, inference_threads=2), cores=2
    ) == InferenceLayout(3, 2)
    assert inference_layout(Settings(inference_solo_threads=1), cores=2) == InferenceLayout(2, 1)
    assert inference_layout(Settings(inference_solo_threads=3), cores=2) == InferenceLayout(2, 1, 3)
    assert str(InferenceLayout(2, 1)) == "2x1"
    assert str(InferenceLayout(2, 1, 2)) == "2x1 (alone: 2)"
