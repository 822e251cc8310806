"""A misspelt ``EMBEDPLEX_*`` variable is refused at start, never skipped (security review:
``EMBEDPLEX_APIKEY`` left the server open, ``EMBEDPLEX_STATE_URI`` gave each replica its own
SQLite, ``EMBEDPLEX_METRIC_PORT`` served /metrics on the public port, all with exit 0)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedplex.cli.main import app
from embedplex.config import Settings
from embedplex.config_env import UnknownEnvNames, check_env_names
from helpers import serve_refused

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent

# The reviewer's reproduction: four typos, each value one a log must never show.
TYPOS = {
    "EMBEDPLEX_APIKEY": ("a-long-secret-key-123", "EMBEDPLEX_API_KEY"),
    "EMBEDPLEX_STATE_URI": ("postgresql://u:pw-Sekr1t@db/x", "EMBEDPLEX_STATE_URL"),
    "EMBEDPLEX_REDIS_URI": ("redis://:r3dis-Sekr1t@r:6379/0", "EMBEDPLEX_REDIS_URL"),
    "EMBEDPLEX_METRIC_PORT": ("9464", "EMBEDPLEX_METRICS_PORT"),
}


def _config_show(env: dict[str, str]) -> tuple[int, str]:
    result = runner.invoke(app, ["config", "show"], env=env)
    return result.exit_code, " ".join(result.output.replace("│", "").split())


@pytest.mark.parametrize("name", sorted(TYPOS))
def test_a_misspelt_variable_is_refused_with_the_closest_name_and_never_its_value(
    name: str,
) -> None:
    value, meant = TYPOS[name]
    code, text = _config_show({name: value})
    assert code == 2, text
    assert f"unknown environment variable {name} (did you mean {meant}?)" in text
    assert value not in text.replace(" ", "")


def test_serve_refuses_the_reviewers_typos_before_it_starts(tmp_path: Path) -> None:
    done = serve_refused({name: value for name, (value, _) in TYPOS.items()}, tmp_path)
    out = " ".join((done.stdout + done.stderr).replace("│", "").split())  # rich wraps the box
    assert done.returncode == 2, out
    assert "unknown environment variables" in out
    for name, (value, meant) in TYPOS.items():
        assert f"{name} (did you mean {meant}?)" in out
        assert value not in out
    assert not list(tmp_path.iterdir())  # no state store was opened


def test_case_does_not_matter_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("embedplex_port", "7101")  # pydantic-settings reads any case
    assert Settings.load().port == 7101
    monkeypatch.setenv("embedplex_prot", "7102")
    with pytest.raises(UnknownEnvNames, match=r"embedplex_prot \(did you mean EMBEDPLEX_PORT\?\)"):
        Settings.load()


def test_nested_names_are_refused_and_point_at_the_json_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A table key in its own variable was skipped beside the JSON list (the weight stayed 1)."""
    monkeypatch.setenv("EMBEDPLEX_API_KEYS", '[{"id": "a", "key": "a-key-of-16-chars-or-more"}]')
    assert Settings.load().api_keys[0].weight == 1
    monkeypatch.setenv("EMBEDPLEX_API_KEYS__0__WEIGHT", "5")
    with pytest.raises(
        UnknownEnvNames,
        match=r"EMBEDPLEX_API_KEYS__0__WEIGHT \(did you mean EMBEDPLEX_API_KEYS, as JSON\?\)",
    ):
        Settings.load()


def test_the_names_read_outside_the_settings_are_accepted(tmp_path: Path) -> None:
    config = tmp_path / "embedplex.toml"
    config.write_text("port = 7103\n")
    env = {
        "EMBEDPLEX_CONFIG": str(config),
        "EMBEDPLEX_SERVER": "http://127.0.0.1:8080",
        "EMBEDPLEX_BENCH_API_KEY": "bench-key",
        "EMBEDPLEX_TEST_PG": "postgresql://postgres@127.0.0.1:5432/test",
        "EMBEDPLEX_ADMIN_SECRET": "an-admin-secret-of-16+",
    }
    code, text = _config_show(env)
    assert code == 0, text
    assert '"port": 7103' in text


def test_every_name_the_code_and_tests_read_is_known() -> None:
    """A new ``envvar=`` or ``os.environ`` read must join ``OTHER_ENV_NAMES`` (or be a field):
    otherwise setting it would stop ``serve`` in the same shell. The files that spell refused
    names on purpose are left out."""
    on_purpose = {"config_env.py", "test_config_env.py", "test_docs.py"}
    files = [
        path
        for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
        if path.name not in on_purpose
    ]
    pattern = r"\bEMBEDPLEX_[A-Z0-9_]*[A-Z0-9]"
    names = {name for path in files for name in re.findall(pattern, path.read_text())}
    assert {"EMBEDPLEX_SERVER", "EMBEDPLEX_BENCH_API_KEY", "EMBEDPLEX_TEST_PG"} <= names
    check_env_names(dict.fromkeys(names, ""), Settings.model_fields)


def test_kubernetes_service_links_get_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDPLEX_SERVICE_HOST", "10.0.0.7")
    monkeypatch.setenv("EMBEDPLEX_PORT_8080_TCP", "tcp://10.0.0.7:8080")
    with pytest.raises(UnknownEnvNames) as refused:
        Settings.load()
    message = str(refused.value)
    assert "EMBEDPLEX_PORT_8080_TCP, EMBEDPLEX_SERVICE_HOST:" in message
    assert "set enableServiceLinks: false" in message
    assert "did you mean" not in message and "10.0.0.7" not in message
