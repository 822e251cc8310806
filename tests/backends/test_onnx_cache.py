"""The ONNX export runs in a child process: the server never imports torch, a failed or hung
export leaves nothing in the cache and says why, and two processes export a model once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedplex.backends import onnx_cache
from embedplex.backends.model_files import ModelSpec, load_spec
from embedplex.backends.onnx_cache import ensure_onnx
from embedplex.core.errors import FatalBackendError

pytestmark = pytest.mark.slow

# Loads a model that needs exporting (float32, then int8 with its gate) as the server does,
# embeds, and says which heavy modules this process imported.
SERVER_SIDE = """
import asyncio, json, sys
from pathlib import Path
from embedplex.config import Settings
from embedplex.core.types import EmbedRequest
from embedplex.models.embedding import LocalEmbeddingModel

async def main() -> None:
    dims = {}
    for dtype in ("float32", "int8"):
        settings = Settings(
            model_id=sys.argv[1], cache_dir=Path(sys.argv[2]), dtype=dtype, int8_min_cosine=0.5
        )
        model = LocalEmbeddingModel.load(settings)
        await model.start()
        try:
            result = await model.embed(EmbedRequest(inputs=["hello world"], truncate=True))
        finally:
            await model.close()
        dims[dtype] = len(result.vectors[0])
    heavy = ("torch", "transformers", "onnx", "onnxruntime.quantization")
    print(json.dumps({"dims": dims, "imported": [m for m in heavy if m in sys.modules]}))

asyncio.run(main())
"""

# Waits for "go" on stdin, then asks for the export: two of these start it at the same moment.
RACER = """
import json, sys
from pathlib import Path
from embedplex.backends.model_files import load_spec
from embedplex.backends.onnx_cache import ensure_onnx

spec = load_spec(sys.argv[1], Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
path, cached = ensure_onnx(spec, dtype="float32", cache_dir=Path(sys.argv[2]))
print(json.dumps({"path": str(path), "cached": cached}), flush=True)
"""


def leftovers(cache: Path) -> list[str]:
    """Anything but finished entries and lock files: work directories, stray files."""
    found = [p.name for p in cache.glob(".export-*") if not p.name.endswith(".lock")]
    onnx = cache / "onnx"
    if onnx.is_dir():
        found += [p.name for p in onnx.iterdir() if not (p / "model.onnx").is_file()]
    return found


def test_the_serving_process_never_imports_torch(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-c", SERVER_SIDE, str(tiny_model_dir), str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dims"] == {"float32": 32, "int8": 32}
    assert report["imported"] == []
    entries = sorted((cache / "onnx").iterdir())
    assert len(entries) == 2  # both were exported here, not found in a cache
    assert [p.name for p in entries if (p / "quality.json").is_file()] != []
    assert leftovers(cache) == []


def test_a_failed_export_says_why_and_caches_nothing(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    spec = load_spec(str(broken), broken)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="embedplex.backends.onnx_cache")
    with pytest.raises(FatalBackendError) as caught:
        ensure_onnx(spec, dtype="float32", cache_dir=cache)
    message = caught.value.message
    assert "failed in its child process (exit code 1)" in message
    assert "Error" in message.rpartition("(exit code 1): ")[2]  # the child's exception, named
    assert list((cache / "onnx").iterdir()) == []
    assert leftovers(cache) == []
    relayed = [r.getMessage() for r in caplog.records if "export child" in r.getMessage()]
    assert any("exporting" in line for line in relayed)  # the child's own log line
    assert any("Traceback" in line for line in relayed)
    assert max(r.levelno for r in caplog.records if "Traceback" in r.getMessage()) >= logging.ERROR


def hanging_child(*args: object, **kwargs: object) -> list[str]:
    code = (
        "import os, sys, time\n"
        "print(f'INFO:fake.exporter:started as {os.getpid()}', file=sys.stderr, flush=True)\n"
        "time.sleep(120)\n"
    )
    return [sys.executable, "-c", code]


def test_a_hung_export_is_killed_at_its_timeout(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(onnx_cache, "export_command", hanging_child)
    spec: ModelSpec = load_spec(str(tiny_model_dir), tiny_model_dir)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="embedplex.backends.onnx_cache")
    with pytest.raises(FatalBackendError, match=r"timed out after 5 s.*started as \d+"):
        ensure_onnx(spec, dtype="float32", cache_dir=cache, timeout=5.0)
    (line,) = [r.getMessage() for r in caplog.records if "started as" in r.getMessage()]
    pid = int(line.rsplit(" ", 1)[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert list((cache / "onnx").iterdir()) == []
    assert leftovers(cache) == []


def test_two_processes_starting_together_export_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tiny_model_dir), str(cache)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for _ in range(2)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline().strip() == "ready"
        for racer in racers:  # both ask at once: the export takes seconds, this microseconds
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        outputs = [racer.communicate(timeout=600) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.communicate()
    assert [r.returncode for r in racers] == [0, 0], [err[-3000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["cached"] for r in results) == [False, True]  # one exported, one waited
    assert results[0]["path"] == results[1]["path"]
    assert len(list((cache / "onnx").iterdir())) == 1
    assert leftovers(cache) == []

    import onnxruntime as ort

    session = ort.InferenceSession(results[0]["path"], providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} >= {"input_ids", "attention_mask"}


def test_the_model_hash_covers_an_onnx_only_directorys_weights(tmp_path: Path) -> None:
    """New weights in ``onnx/model.onnx`` (no safetensors) change the hash: the export cache
    and the Redis identity must not keep the old file's."""
    from embedplex.backends.onnx_cache import model_hash

    (tmp_path / "onnx").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"old weights")
    old = model_hash(tmp_path)
    assert model_hash(tmp_path) == old  # the same files: the same digest
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"new weights, longer")
    assert model_hash(tmp_path) != old


def test_an_unwritable_cache_dir_is_named_as_the_onnx_cache(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A cache dir that cannot be written (here: under a file, which fails as a read-only
    mount does, even for root) and holds no export: refused at start in one line naming
    --cache-dir (as a bad state dir is), and, reached anyway, the load says the same."""
    from embedplex.config import Settings
    from embedplex.serve.server import StartupError, check_start

    (tmp_path / "file").write_text("not a directory")
    cache = tmp_path / "file" / "cache"
    expected = (
        f"the ONNX cache directory {cache} is not writable (Not a directory): point "
        "--cache-dir (EMBEDPLEX_CACHE_DIR) at a writable directory"
    )
    settings = Settings(cache_dir=cache, state_url=f"sqlite:///{tmp_path / 'state.db'}")
    with pytest.raises(StartupError) as caught:
        check_start(settings)
    assert str(caught.value) == expected
    assert check_start(settings.model_copy(update={"backend": "torch"})) is None  # no cache
    spec = load_spec(str(tiny_model_dir), tiny_model_dir)
    with pytest.raises(FatalBackendError) as refused:
        ensure_onnx(spec, dtype="float32", cache_dir=cache)
    assert refused.value.message == (
        f"the ONNX export of {tiny_model_dir} (float32) is not cached yet, and {expected}"
    )
