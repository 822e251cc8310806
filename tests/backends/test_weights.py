"""The model hash covers every weight file: shards, their indexes, an ONNX graph's external
data; and its per-process memo notices a file replaced with its old size and mtime."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from embedplex.backends.onnx_cache import model_hash
from embedplex.backends.weights import onnx_data_files


def write(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


CONFIG = b'{"model_type": "bert", "hidden_size": 32}'


def test_two_sharded_models_with_one_config_get_different_hashes(tmp_path: Path) -> None:
    def sharded(name: str, seed: bytes, index: str) -> Path:
        return write(
            tmp_path / name,
            {
                "config.json": CONFIG,
                "model-00001-of-00002.safetensors": b"first shard " + seed,
                "model-00002-of-00002.safetensors": b"second shard " + seed,
                index: b'{"weight_map": {}}',
            },
        )

    a = sharded("a", b"0", "model.safetensors.index.json")
    b = sharded("b", b"1", "model.safetensors.index.json")
    assert model_hash(a) != model_hash(b)
    # PyTorch shards, too.
    c = write(tmp_path / "c", {"config.json": CONFIG, "pytorch_model-00001-of-00001.bin": b"0"})
    d = write(tmp_path / "d", {"config.json": CONFIG, "pytorch_model-00001-of-00001.bin": b"1"})
    assert model_hash(c) != model_hash(d)
    # A directory of one weight file hashes as it always did: caches keyed by it stay valid.
    single = write(tmp_path / "single", {"config.json": CONFIG, "model.safetensors": b"w"})
    old = hashlib.sha256(b"config.json" + CONFIG + b"model.safetensors" + b"w").hexdigest()
    assert model_hash(single) == old


def test_a_new_shard_or_a_changed_one_changes_the_hash(tmp_path: Path) -> None:
    root = write(
        tmp_path / "m",
        {"config.json": CONFIG, "model-00001-of-00002.safetensors": b"one"},
    )
    first = model_hash(root)
    write(root, {"model-00002-of-00002.safetensors": b"two"})
    second = model_hash(root)
    assert second != first
    write(root, {"model-00002-of-00002.safetensors": b"TWO"})
    assert model_hash(root) not in (first, second)


def test_the_hash_covers_an_onnx_graphs_external_data(tmp_path: Path) -> None:
    root = write(
        tmp_path / "m",
        {
            "config.json": CONFIG,
            "onnx/model.onnx": b"graph",
            "onnx/model.onnx_data": b"weights 0",
            "onnx/model_O4.onnx": b"a variant that is never served",
        },
    )
    old = model_hash(root)
    (root / "onnx" / "model.onnx_data").write_bytes(b"weights 1")
    assert model_hash(root) != old
    # The graph's variants are not read.
    current = model_hash(root)
    (root / "onnx" / "model_O4.onnx").write_bytes(b"another variant")
    assert model_hash(root) == current


def test_a_weight_file_rewritten_with_its_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"config.json": CONFIG, "model.safetensors": b"old weights"})
    weights = root / "model.safetensors"
    before = weights.stat()
    old = model_hash(root)
    time.sleep(0.05)  # past the kernel's coarse clock tick, so that the ctime moves
    weights.write_bytes(b"new weights")  # in place: the same inode, the same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` would
    assert weights.stat().st_ino == before.st_ino
    assert model_hash(root) != old


def test_other_graphs_data_is_left_out(tmp_path: Path) -> None:
    """Only model.onnx's own data is hashed and copied, not a variant's (gigabytes each)."""
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for name in ("model.onnx", "model.onnx_data", "model_fp16.onnx", "model_fp16.onnx_data"):
        (onnx_dir / name).write_bytes(name.encode())
    assert [p.name for p in onnx_data_files(onnx_dir)] == ["model.onnx_data"]
