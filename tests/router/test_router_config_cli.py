"""Router configuration (TOML, validation, redaction) and ``embedplex providers`` commands."""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from embedplex.api.app import create_app
from embedplex.cli.main import app as cli
from embedplex.cli.main import default_toml
from embedplex.config import Settings
from embedplex.providers.config import ProviderConfig, RouteConfig
from upstream_fakes import FakeUpstream, ThreadServer, provider

EXAMPLE = Path(__file__).parents[2] / "examples" / "router.toml"
SECRET = "admin-secret-for-cli"


def test_example_config_routes_remote_minilm_to_an_openai_provider() -> None:
    settings = Settings.load(EXAMPLE, port=8080)
    assert settings.local_model is False
    assert settings.routes == [
        RouteConfig(model="remote-minilm", providers=["local-8081"], policy="any")
    ]
    (p,) = settings.providers
    assert p.max_quiet_ms == 10  # its burst still makes one call; a lull flushes
    assert p.type == "openai"
    assert p.endpoint == "http://127.0.0.1:8081"


def test_config_validation() -> None:
    a = ProviderConfig(name="a", type="tei", endpoint="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="unknown providers"):
        Settings(providers=[a], routes=[RouteConfig(model="m", providers=["b"])])
    with pytest.raises(ValueError, match="unique"):
        Settings(providers=[a, a])
    with pytest.raises(ValueError, match="at least one"):
        Settings(local_model=False)
    with pytest.raises(ValueError, match="unique"):  # a route may not shadow the local model
        Settings(providers=[a], routes=[RouteConfig(model=Settings().model_name, providers=["a"])])
    with pytest.raises(ValueError, match="pattern"):
        ProviderConfig(name="bad name", type="tei")
    # The quiet flush: from 0 (off) to a minute; no negative, infinite or NaN spell.
    assert ProviderConfig(name="q", type="voyage", max_quiet_ms=0).max_quiet_ms == 0
    assert ProviderConfig(name="q", type="voyage").max_quiet_ms == 10
    for bad in (-1, 60_001, float("inf"), float("nan"), "soon"):
        with pytest.raises(ValueError, match="max_quiet_ms"):
            ProviderConfig(name="q", type="voyage", max_quiet_ms=bad)
    # The cache switch: a boolean, on unless set off; nothing else is taken for one.
    assert ProviderConfig(name="q", type="voyage").cache is True
    assert ProviderConfig(name="q", type="voyage", cache=False).cache is False
    for bad in (None, "maybe", 2, [], {}):
        with pytest.raises(ValueError, match="cache"):
            ProviderConfig(name="q", type="voyage", cache=bad)


def test_providers_come_from_env_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDPLEX_PROVIDERS", '[{"name": "v", "type": "voyage"}]')
    monkeypatch.setenv("EMBEDPLEX_ROUTES", '[{"model": "m", "providers": ["v"]}]')
    settings = Settings.load()
    assert settings.providers[0].name == "v"
    assert settings.routes[0].policy == "any"


def test_config_show_never_prints_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOYAGE_API_KEY", "vk-very-secret")
    monkeypatch.setenv("EMBEDPLEX_ADMIN_SECRET", "admin-very-secret")
    config = tmp_path / "c.toml"
    config.write_text(
        'local_model = false\n[[providers]]\nname = "v"\ntype = "voyage"\n'
        'api_key_env = "VOYAGE_API_KEY"\n[[routes]]\nmodel = "m"\nproviders = ["v"]\n'
    )
    result = CliRunner().invoke(cli, ["config", "show", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "very-secret" not in result.output
    shown = json.loads(result.output)
    assert shown["admin_secret"] == "***"
    assert shown["providers"][0]["api_key_env"] == "VOYAGE_API_KEY"


def test_serve_has_flags_for_scalars_but_not_for_provider_tables() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "--no-local-model" in result.output
    assert "--router-idle-ttl-s" in result.output
    assert "--providers " not in result.output
    assert "--routes " not in result.output


def test_default_toml_shows_provider_tables_and_stays_valid() -> None:
    text = default_toml()
    assert "# [[providers]]" in text
    assert tomllib.loads(text) == {}
    uncommented = "\n".join(
        line[2:] for line in text.splitlines() if line.startswith("# [[") or " = " in line[2:5]
    )
    assert "[[routes]]" in uncommented


@pytest.fixture
def live_router(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("EMBEDPLEX_ADMIN_SECRET", SECRET)
    settings = Settings.load(
        local_model=False,
        provider_allowed_networks=["127.0.0.0/8"],  # the fake upstream runs on loopback
        providers=[provider("a", upstream)],
        routes=[RouteConfig(model="m", providers=["a"])],
    )
    server = ThreadServer(create_app(settings), lifespan="on")
    server.start()
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield server.url
    finally:
        server.stop()


def test_providers_cli_adds_lists_saves_and_removes(
    live_router: str, upstream: FakeUpstream, tmp_path: Path
) -> None:
    runner = CliRunner()
    saved = tmp_path / "saved.toml"
    args = ["--server", live_router]
    result = runner.invoke(
        cli,
        [
            "providers",
            "add",
            "--name",
            "b",
            "--type",
            "openai",
            "--endpoint",
            upstream.url,
            "--max-batch-size",
            "32",
            "--serve-as",
            "bee",
            "--save",
            str(saved),
            *args,
        ],
        env={"EMBEDPLEX_ADMIN_SECRET": SECRET},
    )
    assert result.exit_code == 0, result.output
    assert tomllib.loads(saved.read_text())["providers"] == [
        {"name": "b", "type": "openai", "endpoint": upstream.url, "max_batch_size": 32}
    ]
    listed = runner.invoke(
        cli, ["providers", "list", "--json", *args], env={"EMBEDPLEX_ADMIN_SECRET": SECRET}
    )
    assert [p["name"] for p in json.loads(listed.output)] == ["a", "b"]
    r = httpx.post(live_router + "/v1/embeddings", json={"model": "bee", "input": "hi"})
    assert r.headers["x-embedplex-provider"] == "b"
    wrong = runner.invoke(
        cli, ["providers", "remove", "b", *args], env={"EMBEDPLEX_ADMIN_SECRET": "wrong"}
    )
    assert wrong.exit_code == 1
    assert "admin secret" in wrong.output
    removed = runner.invoke(
        cli, ["providers", "remove", "b", *args], env={"EMBEDPLEX_ADMIN_SECRET": SECRET}
    )
    assert removed.exit_code == 0, removed.output
    assert "removed provider b" in removed.output
