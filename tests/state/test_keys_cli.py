"""``embedplex keys ...`` and ``embedplex db upgrade`` on the store the settings name."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from embedplex.cli.main import app


def run(*args: str, env: dict[str, str]) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_keys_cli_round_trip(tmp_path: Path) -> None:
    env = {"EMBEDPLEX_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}"}
    assert "up to date" in run("db", "upgrade", env=env)
    created = json.loads(
        run(
            "keys", "create", "--name", "search-frontend", "--models", "minilm,rerank-*",
            "--rpm", "600", "--tpm", "200000", "--max-concurrent", "16",
            "--priority", "interactive", "--expires", "90d", "--json", env=env,
        )
    )  # fmt: skip
    key = created["key"]
    assert key.startswith(f"ep_{created['id']}_")
    assert created["models"] == ["minilm", "rerank-*"] and created["rpm"] == 600
    listed = run("keys", "list", env=env)
    assert "search-frontend" in listed and key not in listed and "active" in listed
    as_json = json.loads(run("keys", "list", "--json", env=env))
    assert as_json[0]["max_concurrent"] == 16 and "key" not in as_json[0]
    plain = run("keys", "create", "--name", "nightly", env=env)
    assert plain.splitlines()[0].startswith("ep_")
    rotated = json.loads(run("keys", "rotate", "nightly", "--json", env=env))
    assert rotated["key"] != plain.splitlines()[0] and rotated["rotated_at"]
    assert "revoked" in run("keys", "revoke", "nightly", env=env)
    again = CliRunner().invoke(app, ["keys", "revoke", "nightly"], env=env)
    assert again.exit_code == 1 and "no active key" in again.output
    assert json.loads(run("keys", "usage", "--since", "24h", "--json", env=env)) == []
    # --state-url beats the environment, as flags do.
    other = tmp_path / "other.db"
    assert "[]" in run("keys", "list", "--json", "--state-url", f"sqlite:///{other}", env=env)
    bad = CliRunner().invoke(app, ["keys", "create", "--name", "x", "--expires", "9q"], env=env)
    assert bad.exit_code != 0


def test_keys_cli_refuses_limits_past_the_columns_and_a_zero_lifetime(tmp_path: Path) -> None:
    env = {"EMBEDPLEX_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}"}
    for flag, value in (
        ("--rpm", "3000000000"),
        ("--tpm", "3000000000"),
        ("--max-concurrent", "3000000000"),
        ("--weight", "1001"),  # as the API's bound
        ("--expires", "0d"),
    ):
        bad = CliRunner().invoke(app, ["keys", "create", "--name", "x", flag, value], env=env)
        assert bad.exit_code == 2, (flag, bad.output)  # a usage error, nothing created
    assert json.loads(run("keys", "list", "--json", env=env)) == []


def test_keys_take_data_dir_as_serve_does_and_say_which_store(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    data = tmp_path / "data"
    out = run("keys", "create", "--name", "k", "--data-dir", str(data), env=env)
    assert out.splitlines()[0].startswith("ep_")
    assert f"state store: sqlite+aiosqlite:///{data / 'state.db'}" in out
    assert (data / "state.db").is_file() and not (tmp_path / "xdg").exists()
    listed = json.loads(run("keys", "list", "--json", "--data-dir", str(data), env=env))
    assert [r["name"] for r in listed] == ["k"]
    assert json.loads(run("keys", "list", "--json", env=env)) == []  # the default store
