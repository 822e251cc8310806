"""Secrets and the security settings are checked at start: a bad one stops the server with a
clear message (issue 14: empty secrets, the admin secret, provider keys and networks, TLS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from embedplex.config import Settings
from embedplex.providers.config import ProviderConfig

BLANK = ["", " ", "\t", "  \n "]


@pytest.mark.parametrize("field", ["api_key", "admin_secret"])
@pytest.mark.parametrize("value", BLANK)
def test_empty_or_whitespace_secrets_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=f"{field} is set but empty"):
        Settings.load(None, **{field: value})


@pytest.mark.parametrize("field", ["api_key", "admin_secret"])
def test_blank_secrets_from_the_environment_are_refused(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"EMBEDPLEX_{field.upper()}", "   ")
    with pytest.raises(ValidationError, match=f"{field} is set but empty"):
        Settings.load(None)


def test_a_secret_padded_with_whitespace_is_refused() -> None:
    # No Authorization header can carry it (tokens are stripped): it would lock everyone out.
    with pytest.raises(ValidationError, match="whitespace"):
        Settings.load(None, api_key=" k3y")


def test_real_secrets_pass_and_the_admin_secret_is_not_the_key() -> None:
    s = Settings.load(None, api_key="data-key", admin_secret="admin-key-long-enough")
    assert s.api_key is not None and s.admin_secret is not None
    with pytest.raises(ValidationError, match="admin_secret must differ from api_key"):
        Settings.load(None, api_key="same-secret-for-both", admin_secret="same-secret-for-both")


def test_a_static_key_in_the_managed_keys_form_is_refused() -> None:
    """The auth stage sends every ``ep_`` token to the key store: such a static key was
    accepted here and then never authenticated."""
    with pytest.raises(ValidationError, match="must not start with 'ep_'"):
        Settings.load(None, api_key="ep_static-secret-0123")
    with pytest.raises(ValidationError, match="must not start with 'ep_'"):
        Settings.load(None, api_keys=[{"id": "etl", "key": "ep_0123456789abcdef"}])
    assert Settings.load(None, api_key="static_ep_secret").api_key is not None


@pytest.mark.parametrize("value", ["a", "adm", "fifteen-chars-x"])
def test_a_short_admin_secret_is_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="admin_secret needs at least 16 characters"):
        Settings.load(None, admin_secret=value)


def test_an_admin_secret_of_16_characters_passes() -> None:
    s = Settings.load(None, admin_secret="sixteen-chars-ok")
    assert s.admin_secret is not None and len(s.admin_secret.get_secret_value()) == 16


def test_provider_key_envs_are_names_and_never_embedplex_own() -> None:
    s = Settings.load(None, provider_key_envs="OPENAI_API_KEY, VOYAGE_KEY")
    assert s.provider_key_envs == ["OPENAI_API_KEY", "VOYAGE_KEY"]
    with pytest.raises(ValidationError, match="not an environment variable name"):
        Settings.load(None, provider_key_envs=["BAD-NAME"])
    with pytest.raises(ValidationError, match="embedplex's own"):
        Settings.load(None, provider_key_envs=["EMBEDPLEX_ADMIN_SECRET"])


def test_provider_allowed_networks_are_networks() -> None:
    s = Settings.load(None, provider_allowed_networks="10.0.0.0/8,fd00::/8")
    assert s.provider_allowed_networks == ["10.0.0.0/8", "fd00::/8"]
    with pytest.raises(ValidationError, match="not a network"):
        Settings.load(None, provider_allowed_networks=["10.0.0.0/33"])


def test_config_file_providers_may_be_private_but_never_the_metadata_address() -> None:
    # The operator's own providers: a TEI sidecar on loopback is fine.
    ProviderConfig(name="sidecar", type="tei", endpoint="http://127.0.0.1:8081")
    ProviderConfig(name="lan", type="openai", endpoint="http://10.1.2.3/v1")
    for url in (
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:169.254.169.254]/",
    ):
        with pytest.raises(ValidationError, match="metadata"):
            ProviderConfig(name="p", type="openai", endpoint=url)


def test_tls_settings_go_together(tmp_path: Path) -> None:
    cert, key, ca = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem"))
    with pytest.raises(ValidationError, match="needs ssl_certfile"):
        Settings.load(None, ssl_ca_certs=ca)
    with pytest.raises(ValidationError, match="needs ssl_ca_certs"):
        Settings.load(None, ssl_certfile=cert, ssl_keyfile=key, ssl_client_cert="required")
    s = Settings.load(
        None, ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=ca, ssl_client_cert="required"
    )
    assert s.ssl_client_cert == "required"


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    return subprocess.run(
        [sys.executable, "-m", "embedplex", "serve", "--port", "0", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--api-key", ""], {}, "api_key is set but empty"),
        ([], {"EMBEDPLEX_ADMIN_SECRET": "  "}, "admin_secret is set but empty"),
        (["--admin-secret", "a"], {}, "admin_secret needs at least 16 characters"),
        (
            ["--api-key", "x1-long-enough-key", "--admin-secret", "x1-long-enough-key"],
            {},
            "admin_secret must differ",
        ),
    ],
)
def test_serve_refuses_to_start_with_an_empty_secret(
    args: list[str], env: dict[str, str], message: str
) -> None:
    done = _serve(*args, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in " ".join((done.stdout + done.stderr).split())
