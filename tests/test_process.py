"""The real process: `embedplex serve` with the default model, driven by the openai SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import free_port, wait_ready
from reference import TEXTS, min_cosine

pytestmark = [pytest.mark.slow, pytest.mark.model]


def start_server(port: int, cache: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    env["EMBEDPLEX_CACHE_DIR"] = str(cache)
    return subprocess.Popen(
        [sys.executable, "-m", "embedplex", "serve", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[str]:
    port = free_port()
    proc = start_server(port, model_cache)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if proc.stdout:
            proc.stdout.close()


def test_openai_sdk_works_unchanged(server: str, reference: np.ndarray) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    short = TEXTS[:13]
    # The SDK asks for base64 by default and decodes it itself.
    default = client.embeddings.create(input=short, model="text-embedding-3-small")
    floats = client.embeddings.create(input=short, model="any", encoding_format="float")
    one = client.embeddings.create(input=TEXTS[1], model="m", dimensions=128)
    assert [d.index for d in default.data] == list(range(13))
    assert min_cosine(np.array([d.embedding for d in default.data]), reference[:13]) >= 0.99999
    assert min_cosine(np.array([d.embedding for d in floats.data]), reference[:13]) >= 0.99999
    assert len(one.data[0].embedding) == 128
    assert default.usage.prompt_tokens > 13
    assert default.model == "sentence-transformers/all-MiniLM-L6-v2"


def test_openai_sdk_sees_errors_as_its_own_exceptions(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    # OpenAI answers 400 for an invalid request: the SDK's BadRequestError, body parsed.
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input="x", model="m", dimensions=5000)
    assert "dimensions" in str(info.value)
    assert (info.value.code, info.value.param) == ("invalid_value", "dimensions")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(input=[], model="m")


def test_curl_style_tei_request(server: str, reference: np.ndarray) -> None:
    r = httpx.post(server + "/embed", json={"inputs": TEXTS, "truncate": True}, timeout=60)
    assert r.status_code == 200
    assert min_cosine(np.array(r.json()), reference) >= 0.99999


def test_sigterm_drains_queued_work_and_exits_zero(tmp_path: Path, model_cache: Path) -> None:
    port = free_port()
    proc = start_server(
        port, model_cache, "--max-batch-requests", "4", "--admin-secret", "test-admin-secret"
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        statuses: list[int] = []
        lock = threading.Lock()
        long_text = TEXTS[-1]

        def call() -> None:
            r = httpx.post(
                base + "/embed", json={"inputs": [long_text] * 4, "truncate": True}, timeout=60
            )
            with lock:
                statuses.append(r.status_code)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until all eight are in: one batch runs, the rest wait
            admin = {"authorization": "Bearer test-admin-secret"}
            models = httpx.get(base + "/api/v1/status", headers=admin, timeout=5).json()["models"]
            with lock:
                if sum(m["active_requests"] for m in models.values()) + len(statuses) == 8:
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stdout:
            proc.stdout.close()
    assert statuses == [200] * 8
    assert code == 0


def test_tls(tmp_path: Path, model_cache: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    san = ["-addext", "subjectAltName=IP:127.0.0.1"]
    cmd = [*openssl.split(), *san, "-keyout", str(key), "-out", str(cert)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = start_server(port, model_cache, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/health/ready", verify=str(cert), timeout=1)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None
            time.sleep(0.2)
        r = httpx.post(f"https://127.0.0.1:{port}/embed", json={"inputs": "hi"}, verify=str(cert))
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if proc.stdout:
            proc.stdout.close()


def test_the_server_runs_the_connection_limits(server: str) -> None:
    """serve/edge.py is in front of the real process: oversized headers get 431 JSON."""
    import socket

    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\nx-big: " + b"v" * 20000 + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 431 ")
    assert b'"error_type":"Validation"' in data
    metrics = httpx.get(server + "/metrics", timeout=30).text
    assert 'embedplex_connection_refusals_total{reason="headers_too_large"} 1.0' in metrics
