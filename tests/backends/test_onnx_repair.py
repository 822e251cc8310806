"""The ONNX export cache repairs what it finds damaged, serves a graph with external data, and
holds a cached int8 export to the gate of the start that uses it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from embedplex.backends import onnx_cache
from embedplex.backends.model_files import ModelSpec, load_spec
from embedplex.backends.onnx import OnnxBackend
from embedplex.backends.onnx_cache import ensure_onnx
from embedplex.core.errors import FatalBackendError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def external_dir(shipped_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX-only model whose graph keeps its weights in ``onnx/model.onnx_data``."""
    import onnx

    root = tmp_path_factory.mktemp("external") / "m"
    shutil.copytree(shipped_dir, root)
    (root / "model.safetensors").unlink()
    graph = onnx.load(str(shipped_dir / "onnx" / "model.onnx"))
    onnx.save(
        graph,
        str(root / "onnx" / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
        size_threshold=0,
    )
    assert (root / "onnx" / "model.onnx").stat().st_size < 100_000  # the weights are elsewhere
    return root


def load(spec: ModelSpec, cache: Path, dtype: str = "float32") -> OnnxBackend:
    return OnnxBackend.load(
        spec, dtype=dtype, device="cpu", cache_dir=cache, threads=1, int8_min_cosine=0.5
    )


def test_an_entry_without_its_graph_is_replaced_durably(
    shipped_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(str(shipped_dir), shipped_dir)
    cache = tmp_path / "cache"
    path, _ = ensure_onnx(spec, dtype="float32", cache_dir=cache)
    path.unlink()  # the graph gone, the folder left (a crash, a cleaner)
    (path.parent / "stray").write_text("x")
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    again, cached = ensure_onnx(spec, dtype="float32", cache_dir=cache)
    assert (again, cached) == (path, False)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    # The file and its folder before the rename, the cache's folder after it.
    assert synced == ["model.onnx", "out", "onnx"]
    load(spec, cache).close()


def test_a_damaged_cached_graph_is_exported_again_once(shipped_dir: Path, tmp_path: Path) -> None:
    spec = load_spec(str(shipped_dir), shipped_dir)
    cache = tmp_path / "cache"
    path, _ = ensure_onnx(spec, dtype="float32", cache_dir=cache)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated: INVALID_PROTOBUF
    backend = load(spec, cache)
    try:
        assert backend.dim == 32
    finally:
        backend.close()
    assert path.read_bytes() == data


def test_a_cached_graph_that_fails_for_another_reason_is_kept(
    shipped_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that fails for want of memory (or a provider) is not a damaged entry: the start
    fails with the reason, and the entry, which other servers may be reading, stays."""
    from embedplex.backends import onnx

    spec = load_spec(str(shipped_dir), shipped_dir)
    cache = tmp_path / "cache"
    path, _ = ensure_onnx(spec, dtype="float32", cache_dir=cache)
    inode = path.stat().st_ino

    def out_of_memory(*args: object) -> None:
        raise FatalBackendError(f"cannot load the ONNX graph {path}: std::bad_alloc")

    monkeypatch.setattr(onnx, "_sessions", out_of_memory)
    with pytest.raises(FatalBackendError, match="bad_alloc"):
        load(spec, cache)
    assert path.stat().st_ino == inode


def test_a_graph_with_external_data_is_served_and_cached_whole(
    external_dir: Path, tmp_path: Path
) -> None:
    spec = load_spec(str(external_dir), external_dir)
    cache = tmp_path / "cache"
    for dtype in ("float32", "float16", "float32"):
        backend = load(spec, cache, dtype)
        backend.close()
    entries = {p.name: sorted(q.name for q in p.iterdir()) for p in (cache / "onnx").iterdir()}
    assert sorted(entries.values()) == [
        ["model.onnx", "model.onnx.data"],  # float16, written with its data beside it
        ["model.onnx", "model.onnx_data"],  # float32, copied with it
    ]


def test_a_cached_int8_export_is_held_to_this_starts_gate(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = load_spec(str(tiny_model_dir), tiny_model_dir)
    cache = tmp_path / "cache"
    path, cached = ensure_onnx(spec, dtype="int8", cache_dir=cache, min_quality=0.0)
    assert not cached
    measured = json.loads((path.parent / "quality.json").read_text())["min_cosine"]
    assert measured < 1.0
    # A stricter gate: exported again with it, as a cold cache would be, and refused.
    with pytest.raises(FatalBackendError, match=r"exit code 2\): int8 .* min cosine of 1\.0"):
        ensure_onnx(spec, dtype="int8", cache_dir=cache, min_quality=1.0)
    # The laxer start still uses what it exported.
    assert ensure_onnx(spec, dtype="int8", cache_dir=cache, min_quality=0.0) == (path, True)
    # An int8 entry without its record is exported again too.
    (path.parent / "quality.json").unlink()
    assert ensure_onnx(spec, dtype="int8", cache_dir=cache, min_quality=0.0) == (path, False)
    assert (path.parent / "quality.json").is_file()


def fake_child(spec: ModelSpec, work: Path, **kwargs: object) -> list[str]:
    """An int8 'export' that passes at 0.99: its graph is the shipped float32 one."""
    code = (
        "import json, shutil, sys; from pathlib import Path\n"
        "out = Path(sys.argv[2]) / 'out'; out.mkdir()\n"
        "shutil.copyfile(sys.argv[1], out / 'model.onnx')\n"
        "(out / 'quality.json').write_text(json.dumps({'min_cosine': 0.99}))\n"
    )
    return [sys.executable, "-c", code, str(spec.onnx_file), str(work)]


def test_a_cached_int8_export_under_a_laxer_gate_is_replaced(
    shipped_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(str(shipped_dir), shipped_dir)
    cache = tmp_path / "cache"
    entry = cache / "onnx" / onnx_cache.cache_key(spec.path, "int8", spec.kind.value)
    entry.mkdir(parents=True)
    shutil.copyfile(shipped_dir / "onnx" / "model.onnx", entry / "model.onnx")
    (entry / "quality.json").write_text(json.dumps({"min_cosine": 0.9}))
    monkeypatch.setattr(onnx_cache, "export_command", fake_child)
    assert ensure_onnx(spec, dtype="int8", cache_dir=cache, min_quality=0.8)[1] is True
    path, cached = ensure_onnx(spec, dtype="int8", cache_dir=cache, min_quality=0.95)
    assert (path, cached) == (entry / "model.onnx", False)
    assert json.loads((entry / "quality.json").read_text())["min_cosine"] == 0.99
    assert [p.name for p in cache.glob(".export-*") if not p.name.endswith(".lock")] == []
