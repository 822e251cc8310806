"""Loading a model by hub id through HF_ENDPOINT, from a mirror served on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from embedplex.core.errors import FatalBackendError
from helpers import free_port, served
from hub_mirror import COMMIT, mirror_app

pytestmark = pytest.mark.slow

REPO = "tiny-org/tiny-bert"


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EMBEDPLEX_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    return env


RESOLVE = (
    "import sys; from embedplex.backends.model_files import resolve_model_dir, load_spec\n"
    "rev = sys.argv[2] if len(sys.argv) > 2 else None\n"
    "path, sha = resolve_model_dir(sys.argv[1], revision=rev)\n"
    "spec = load_spec(sys.argv[1], path, sha=sha)\n"
    "print(path, sha, spec.max_input_length, spec.pooling)\n"
)


def resolve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Resolve in a fresh interpreter: huggingface_hub reads HF_ENDPOINT at import."""
    cmd = [sys.executable, "-c", RESOLVE, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_resolve_downloads_from_the_mirror_and_then_works_offline(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with served(mirror_app(REPO, tiny_model_dir), health_path="/api/models/x/y/revision/z") as url:
        out = resolve(hub_env(url, tmp_path), REPO)
        assert out.returncode == 0, out.stderr
        path, sha, max_len, pooling = out.stdout.split()
        assert sha == COMMIT
        assert max_len == "32" and pooling == "mean"
        assert (Path(path) / "model.safetensors").is_file()
        pinned = resolve(hub_env(url, tmp_path), REPO, COMMIT)
        assert pinned.returncode == 0, pinned.stderr
        missing = resolve(hub_env(url, tmp_path), "tiny-org/absent")
        assert missing.returncode != 0
        assert "cannot load model 'tiny-org/absent'" in missing.stderr
    # The mirror is gone: the cache alone serves it now.
    offline = hub_env("http://127.0.0.1:9", tmp_path) | {"HF_HUB_OFFLINE": "1"}
    again = resolve(offline, REPO)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[0] == path


def _repo(tiny_model_dir: Path, root: Path, weights: str) -> Path:
    """The tiny model with its weights in one form, an ONNX export with external data beside a
    variant nobody serves, and code that must never be fetched."""
    import torch
    from transformers import BertModel

    repo = Path(shutil.copytree(tiny_model_dir, root / weights))
    model = BertModel.from_pretrained(str(repo))
    if weights == "sharded":
        (repo / "model.safetensors").unlink()
        model.save_pretrained(str(repo), max_shard_size="20KB")
    if weights in ("bin", "both"):  # transformers 5 saves safetensors only: the old form by hand
        torch.save(model.state_dict(), repo / "pytorch_model.bin")
    if weights == "bin":
        (repo / "model.safetensors").unlink()
    (repo / "onnx").mkdir()
    for name in ("model.onnx", "model.onnx_data", "model_O4.onnx", "model_O4.onnx_data"):
        (repo / "onnx" / name).write_bytes(b"not read here")
    (repo / "modeling_custom.py").write_text("raise SystemExit('never run')\n")
    (repo / "1_Pooling" / "custom.py").write_text("raise SystemExit('never run')\n")
    return repo


_EXPECTED = {
    "sharded": {
        "model.safetensors.index.json",
        *(f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)),
    },
    "bin": {"pytorch_model.bin"},
    "both": {"model.safetensors"},
}


@pytest.mark.parametrize("weights", sorted(_EXPECTED))
def test_every_weight_form_downloads_what_serving_needs(
    tiny_model_dir: Path, tmp_path: Path, weights: str
) -> None:
    """Sharded safetensors with their index, pytorch_model.bin where there is no safetensors,
    the ONNX file's external data; never code, nor ONNX variants nobody serves."""
    from transformers import AutoModel

    repo = _repo(tiny_model_dir, tmp_path, weights)
    with served(mirror_app(REPO, repo), health_path="/api/models/x/y/revision/z") as url:
        out = resolve(hub_env(url, tmp_path / "home"), REPO)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.split()[0])
    got = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert _EXPECTED[weights] <= got
    assert {"onnx/model.onnx", "onnx/model.onnx_data"} <= got
    assert not {f for f in got if f.endswith(".py") or "O4" in f}
    if weights == "both":
        assert "pytorch_model.bin" not in got
    if weights != "sharded":
        assert "model.safetensors.index.json" not in got
    loaded = AutoModel.from_pretrained(str(path)).state_dict()  # every weight there
    original = AutoModel.from_pretrained(str(tiny_model_dir)).state_dict()
    assert loaded.keys() == original.keys()
    assert all(loaded[k].equal(original[k]) for k in original)
    offline = hub_env("http://127.0.0.1:9", tmp_path / "home") | {"HF_HUB_OFFLINE": "1"}
    again = resolve(offline, REPO)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[0] == str(path)


def test_serve_by_hub_id_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    with served(mirror_app(REPO, tiny_model_dir), health_path="/api/models/x/y/revision/z") as url:
        env = hub_env(url, tmp_path) | {"EMBEDPLEX_CACHE_DIR": str(tmp_path / "exports")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedplex", "serve", "--model-id", REPO, "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(base + "/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
            info = httpx.get(base + "/info").json()
            embed = httpx.post(base + "/embed", json={"inputs": "hello world"})
        finally:
            proc.terminate()
            proc.wait(30)
    assert info["model_id"] == REPO
    assert info["model_sha"] == COMMIT
    assert embed.status_code == 200
    assert len(embed.json()[0]) == 32
    # The download is in huggingface_hub's cache (HF_HOME), where `hf download` and every other
    # tool look; EMBEDPLEX_CACHE_DIR holds only ONNX exports.
    assert (tmp_path / "hub" / "models--tiny-org--tiny-bert" / "snapshots" / COMMIT).is_dir()
    assert not list((tmp_path / "exports").glob("models--*"))


def test_unreachable_hub_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from embedplex.backends.model_files import resolve_model_dir

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(FatalBackendError, match="not a local directory"):
        resolve_model_dir("nobody/nothing-here")
