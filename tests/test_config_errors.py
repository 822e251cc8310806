"""Config errors and printed settings never carry a secret, and ``-c`` works on every command
(ops review: secrets in BadParameter text, ?password= in the state URL, -c lost on serve)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from embedplex.cli.main import app
from embedplex.state.url import resolve

runner = CliRunner()


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """``serve`` sets up logging on the runner's stream, which closes after the invoke: the
    session's handlers come back, or a later test's log line fails on a closed file."""
    from embedplex.observability import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    if logs._writer is not None:
        logs._writer.stop()
        logs._writer = None
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("env", "secret", "reason"),
    [
        ({"EMBEDPLEX_ADMIN_SECRET": "short-Adm1n"}, "short-Adm1n", "at least 16 characters"),
        ({"EMBEDPLEX_API_KEY": "ep_Sekr1t-key-value-long"}, "Sekr1t", "must not start with"),
        (
            {
                "EMBEDPLEX_PROVIDERS": '[{"name": "p", "type": "tei", '
                '"endpoint": "http://user:hunter2pass@example.com"}]'
            },
            "hunter2pass",
            "carries no credentials",
        ),
        (
            {
                "EMBEDPLEX_PROVIDERS": '[{"name": "p", "type": "tei", '
                '"endpoint": "http://[::1/embed?key=Sekr1tK3y"}]'
            },
            "Sekr1tK3y",
            "not a valid URL",
        ),
        (
            {"EMBEDPLEX_API_KEYS": '[{"id": "a", "key": "short-Sekr1t"}]'},
            "short-Sekr1t",
            "at least 16 characters",
        ),
    ],
)
def test_a_refused_setting_is_named_with_its_reason_but_never_echoed(
    env: dict[str, str], secret: str, reason: str
) -> None:
    result = runner.invoke(app, ["config", "show"], env=env)
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # rich wraps the error box
    assert reason in text
    assert secret not in result.output.replace("\n", "").replace("│", "")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://u:pw1@h:5/db?password=sekret&sslpassword=k3y&schema=a",
            "postgresql://u:***@h:5/db?password=***&sslpassword=***&schema=a",
        ),
        ("postgresql://h/db?PassWord=sekret", "postgresql://h/db?PassWord=***"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///x/state.db", "sqlite:///x/state.db"),
    ],
)
def test_redact_url_hides_userinfo_and_query_passwords(url: str, shown: str) -> None:
    from embedplex.state.url import redact_url  # new with the fix: the other tests run without

    assert redact_url(url) == shown


def test_the_store_description_and_config_show_hide_a_query_password() -> None:
    url = "postgresql://u:pw1@h/db?password=sekret&sslpassword=k3y"
    assert "sekret" not in resolve(url).display() and "k3y" not in resolve(url).display()
    result = runner.invoke(app, ["config", "show"], env={"EMBEDPLEX_STATE_URL": url})
    assert result.exit_code == 0, result.output
    assert "sekret" not in result.output and "k3y" not in result.output
    assert "pw1" not in result.output and "password=***" in result.output


@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_config_show_reads_the_file_named_by_dash_c(flag: str, tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text("port = 9191\n")
    result = runner.invoke(app, ["config", "show", flag, str(path)])
    assert result.exit_code == 0, result.output
    assert '"port": 9191' in result.output
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    config = next(p for p in serve.params if p.name == "config")
    assert config.opts == ["--config", "-c"]


def _fails_clearly(args: list[str], *expected: str) -> str:
    """Exit 2 and one line naming the problem, no traceback."""
    result = runner.invoke(app, args, env={"XDG_DATA_HOME": "/nonexistent-xdg"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for part in expected:
        assert part in text, text
    return text


def test_missing_or_mismatched_tls_files_are_named_and_exit_2(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    _fails_clearly(
        ["serve", "--port", "0", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        f"ssl_certfile {cert}: no such file",
    )
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    _fails_clearly(
        ["serve", "--port", "0", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        f"ssl_certfile {cert} and ssl_keyfile {key} do not load",
    )


def test_an_unsupported_or_garbled_state_url_is_refused_at_load() -> None:
    _fails_clearly(["config", "show", "--state-url", "mysql://u:pw1@h/db"], "sqlite:///", "mysql")
    text = _fails_clearly(["keys", "list", "--state-url", "garbage"], "is not a URL")
    assert "pw1" not in text


def test_a_store_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from helpers import free_port

    down = f"postgresql://postgres:pw1@127.0.0.1:{free_port()}/test?password=pw2"
    for command in (["serve", "--port", "0"], ["keys", "list"]):
        text = _fails_clearly([*command, "--state-url", down], "cannot open the state store")
        assert "pw1" not in text and "pw2" not in text
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for command in (["serve", "--port", "0"], ["keys", "list"]):
        _fails_clearly(
            [*command, "--data-dir", str(blocked / "sub")], "cannot create the state store in"
        )
