"""Which files of a model directory hold what decides its outputs, and their digest.

``model_hash`` keys the ONNX export cache (``onnx_cache.py``) and, for a model without a hub
revision, its entries in the shared embedding cache (``models/embedding.py``). It covers every
weight file, sharded or not, so two models whose config alone is the same never share a key,
and the ONNX graph's external data, which the cache copies beside the graph. ``tokenizer_hash``
joins it in the shared cache's identity: that cache keys texts, which the tokenizer turns into
what the weights see.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
from pathlib import Path

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
ONNX_DIR = "onnx"
ONNX_GRAPH = "model.onnx"
# At the top of the directory: single files, shards (``model-00001-of-00002.safetensors``,
# ``pytorch_model-00001-of-00002.bin``) and the shards' indexes.
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")

Signature = tuple[int, int, int, int, int]
# Digests by directory and its files' names and signatures: loading a model hashes its weights
# once, for its ONNX export and its cache identity alike.
_hashes: dict[tuple[str, tuple[tuple[str, Signature], ...]], str] = {}


def onnx_data_files(onnx_dir: Path) -> list[Path]:
    """The external data of ``model.onnx``, sorted: the files beside it named for it
    (``model.onnx_data``, ``model.onnx.data``, as the exporters write them). Other graphs'
    data (``model_fp16.onnx_data``, ``model_q4.onnx_data``: variants never served, gigabytes
    each) are neither hashed nor copied; a graph whose data is named otherwise fails to load
    from the cache, naming the file it lacks."""
    if not onnx_dir.is_dir():
        return []
    return sorted(
        p
        for p in onnx_dir.iterdir()
        if p.name.startswith("model.onnx") and p.name != ONNX_GRAPH and _signature(p) is not None
    )


def hashed_files(model_dir: Path) -> list[str]:
    """What ``model_hash`` reads, relative to ``model_dir``, in its order: the config, the
    weights (sorted by name), the shipped ONNX graph and its data. ``model_hash`` skips the
    missing ones, so a directory with only ``config.json`` and ``model.safetensors`` hashes as
    it always did."""
    weights = sorted({p.name for pattern in _WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    onnx_dir = model_dir / ONNX_DIR
    graph = [f"{ONNX_DIR}/{ONNX_GRAPH}"]
    if (onnx_dir / ONNX_GRAPH).is_file():
        graph += [f"{ONNX_DIR}/{p.name}" for p in onnx_data_files(onnx_dir)]
    return [CONFIG, *weights, *graph]


def model_hash(model_dir: Path) -> str:
    """SHA-256 of what decides a model's outputs: its config and its weights (every safetensors
    and PyTorch file with their shard indexes, and its own ``onnx/model.onnx`` with the graph's
    external data: an ONNX-only directory's weights are those).

    Computed once per process and files: a second call with the same files, each with the same
    size, mtime, ctime, inode and device, returns the first's digest. The ctime is set by the
    kernel on every write, so a file replaced in place with its old size and mtime (``cp -p``)
    is still read again."""
    return _digest(model_dir, hashed_files(model_dir))


def tokenizer_hash(model_dir: Path) -> str:
    """SHA-256 of ``tokenizer.json``: what turns a text into the ids the weights see. The
    shared embedding cache keys texts, so a model directory whose tokenizer changed under the
    same weights must not be answered from the old tokenizer's entries."""
    return _digest(model_dir, [TOKENIZER])


def _digest(model_dir: Path, names: list[str]) -> str:
    """SHA-256 of the named files that exist (name, then content, each), memoized per process
    by the files' signatures (``model_hash`` says what that catches)."""
    found = ((name, _signature(model_dir / name)) for name in names)
    memo = (str(model_dir), tuple((name, sig) for name, sig in found if sig is not None))
    known = _hashes.get(memo)
    if known is not None:
        return known
    digest = hashlib.sha256()
    for name, _ in memo[1]:
        digest.update(name.encode())
        with (model_dir / name).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    _hashes[memo] = hexdigest = digest.hexdigest()
    return hexdigest


def copy_onnx(model_dir: Path, target: Path) -> None:
    """Copy the model's ``onnx/model.onnx`` and its data files into the directory ``target``:
    a graph with external data reads it from beside itself."""
    onnx_dir = model_dir / ONNX_DIR
    shutil.copyfile(onnx_dir / ONNX_GRAPH, target / ONNX_GRAPH)
    for data in onnx_data_files(onnx_dir):
        shutil.copyfile(data, target / data.name)


def _signature(file: Path) -> Signature | None:
    """What changes when a file is rewritten or replaced (None: no such regular file)."""
    try:
        st = file.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
