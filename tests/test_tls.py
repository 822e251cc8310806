"""TLS of a real ``embedplex serve``: 1.2+ only, forward-secret AEAD ciphers, optional mTLS.

A throwaway CA, server and client certificate are made with the ``openssl`` command line for
each test module; the server runs on 127.0.0.1 with remote providers only (no model to load).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import free_port, stop

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, cn: str, extensions: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
    (d / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
             cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=embedplex test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    _issue(d, "server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(d, "client", "test client", "extendedKeyUsage=clientAuth\n")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


CONFIG = """
local_model = false
[[providers]]
name = "p"
type = "openai"
endpoint = "http://127.0.0.1:9/v1"
[[routes]]
model = "m"
providers = ["p"]
"""


@dataclass(frozen=True)
class Server:
    port: int
    pki: Pki


def _client_context(pki: Pki, *, cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def _get(port: int, context: ssl.SSLContext) -> bytes:
    """GET /health/live over TLS; what the server answered (b"" if it closed)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := tls.recv(4096):
            out += chunk
        return out


def _start(tmp: Path, pki: Pki, *args: str) -> Iterator[Server]:
    config = tmp / "tls.toml"
    config.write_text(CONFIG)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedplex", "serve", "--config", str(config), "--port",
         str(port), "--ssl-certfile", str(pki.server_cert), "--ssl-keyfile",
         str(pki.server_key), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        context = _client_context(pki, cert=True)
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if b" 200 " in _get(port, context):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TLS server did not start"
            time.sleep(0.2)
        yield Server(port, pki)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("tls"), pki)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    yield from _start(
        tmp_path_factory.mktemp("mtls"),
        pki,
        "--ssl-ca-certs",
        str(pki.ca),
        "--ssl-client-cert",
        "required",
    )


def _handshake(server: Server, context: ssl.SSLContext) -> tuple[str | None, str | None]:
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cipher = tls.cipher()
        return tls.version(), cipher[0] if cipher else None


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_work(tls_server: Server, version: ssl.TLSVersion) -> None:
    context = _client_context(tls_server.pki, cert=False)
    context.minimum_version = context.maximum_version = version
    got, cipher = _handshake(tls_server, context)
    assert got == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
    assert cipher is not None
    if version is ssl.TLSVersion.TLSv1_2:
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    assert b" 200 " in _get(tls_server.port, context)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_protocols_are_refused(tls_server: Server, version: ssl.TLSVersion) -> None:
    context = _client_context(tls_server.pki, cert=False)
    context.minimum_version = context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer them at all
    with pytest.raises(ssl.SSLError):
        _handshake(tls_server, context)


@pytest.mark.parametrize(
    "cipher",
    [
        "AES128-GCM-SHA256",  # RSA key exchange: no forward secrecy
        "AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-SHA",  # forward secret, but CBC (not AEAD)
        "ECDHE-RSA-AES256-SHA384",
    ],
)
def test_ciphers_without_forward_secrecy_or_aead_are_refused(
    tls_server: Server, cipher: str
) -> None:
    context = _client_context(tls_server.pki, cert=False)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(f"{cipher}:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        _handshake(tls_server, context)


def test_mtls_refuses_a_client_without_a_certificate(mtls_server: Server) -> None:
    with_cert = _client_context(mtls_server.pki, cert=True)
    assert b" 200 " in _get(mtls_server.port, with_cert)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        without = _client_context(mtls_server.pki, cert=False)
        without.minimum_version = without.maximum_version = version
        # TLS 1.2 fails in the handshake; TLS 1.3 sends the refusal after it, so the first
        # read fails (or finds the connection closed) instead.
        try:
            answer = _get(mtls_server.port, without)
        except (ssl.SSLError, ConnectionError):
            continue
        assert answer == b"", (version, answer[:100])
