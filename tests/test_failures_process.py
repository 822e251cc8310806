"""Failures inside, seen from outside: real server processes (a load that fails, SIGTERM with a
pre-stop delay and a request still running when the grace period ends)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port, wait_ready

pytestmark = pytest.mark.slow

# A real `serve` process whose one model is the fake backend, slow: every batch takes DELAY s.
_SLOW_SERVER = """
import sys
from embedplex.backends.fake import FakeBackend
from embedplex.bench.inprocess import fake_gateway
from embedplex.config import Settings
from embedplex.observability.logs import setup_logging
from embedplex.serve.server import serve

model, port, delay, stop_delay, grace = sys.argv[1:]
setup_logging("info", "pretty")
settings = Settings.load(
    None, model_id=model, port=int(port), shutdown_delay_s=float(stop_delay),
    graceful_shutdown_s=float(grace),
)
serve(settings, gateway_factory=fake_gateway(FakeBackend(delay=float(delay))))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return env


def test_a_model_that_fails_to_load_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    port_flag = ("--port", str(free_port()))
    proc = subprocess.run(
        [sys.executable, "-m", "embedplex", "serve", "--model-id", str(empty), *port_flag],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    reason = f"{empty} has no config.json; is it a Hugging Face model directory?"
    assert f"embedplex: model loading failed: {reason}" in proc.stderr.splitlines()
    # The operator's to fix: one line at ERROR, not 50-100 lines of where the code found it.
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert [e.split(" ERROR ", 1)[1].strip() for e in errors] == [
        f"embedplex.api.app: model loading failed: {reason}"
    ]
    assert "Traceback" not in proc.stderr
    command = [sys.executable, "-m", "embedplex", "serve", "--model-id", str(empty), *port_flag]
    debug = subprocess.run(
        [*command, "--log-level", "debug"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # where, for who asks
    # JSON logs: every line on stderr is a JSON object, the failure one of them.
    as_json = subprocess.run(
        [*command, "--log-format", "json"], env=_env(), capture_output=True, text=True, timeout=120
    )
    records = [json.loads(line) for line in as_json.stderr.splitlines() if line.strip()]
    assert as_json.returncode == 1
    assert f"model loading failed: {reason}" in [r["message"] for r in records]


def test_sigterm_waits_the_pre_stop_delay_then_cuts_off_with_a_json_503(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    script = tmp_path / "slow_server.py"
    script.write_text(_SLOW_SERVER)
    # Each batch takes 8 s; SIGTERM: 3 s still serving, then a 1 s grace, then the cut-off.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_model_dir), str(port), "8", "3", "1"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(proc, base, timeout=120)
        answer: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: answer.append(
                httpx.post(base + "/v1/embeddings", json={"input": "slow"}, timeout=30)
            )
        )
        slow.start()
        time.sleep(0.5)  # the request is in its forward pass
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # The pre-stop delay: readiness is false, yet new connections are still served.
        ready = httpx.get(base + "/health/ready", timeout=5)
        live = httpx.get(base + "/health/live", timeout=5)
        served = httpx.post(base + "/tokenize", json={"inputs": "still served"}, timeout=5)
        in_delay = time.monotonic() - signalled
        slow.join(30)
        cut_after = time.monotonic() - signalled
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert in_delay < 3, "probes answered after the delay; the test cannot judge it"
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert live.status_code == 200
    assert served.status_code == 200, served.text  # API work too, not "draining" 503s
    assert len(answer) == 1
    cut = answer[0]
    assert cut.status_code == 503, cut.text
    assert cut.headers["content-type"].startswith("application/json")
    error = cut.json()["error"]
    assert error["type"] == "server_error" and "graceful_shutdown_s" in error["message"]
    assert 3.5 < cut_after < 8.0  # after the delay and the grace, before the pass ended
    assert proc.returncode == 0
    assert "POST /v1/embeddings 503" in out  # its access-log line
    assert "Internal Server Error" not in out
