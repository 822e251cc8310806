"""The ONNX export cache, keyed by model hash; a missing entry is exported in a child process.

The key covers the weights (every file: ``weights.py``), the config, the dtype and the
exporter's versions, so a second start reuses the export and a changed model never meets a stale
one. The export itself runs in ``python -m embedplex.backends.onnx_export`` (a fresh
interpreter, not a fork of this threaded server), so PyTorch never enters the serving process.
One export per key at a time: a lock file makes a second process wait for the first one's entry
instead of exporting it again. The child writes into a temporary directory that is fsynced and
renamed into place only after it exits 0, so a crash, a timeout or a refusal never leaves a
half-written entry. An entry found unusable (no graph, an int8 one measured under a laxer gate
than this start's, one that failed to load) is exported again and replaced under the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from embedplex.backends.child import run_child
from embedplex.backends.model_files import ModelSpec
from embedplex.backends.onnx_export import EXPORT_FORMAT, INT8_FORMAT, OPSET
from embedplex.backends.weights import copy_onnx
from embedplex.backends.weights import model_hash as model_hash  # the cache identity's too
from embedplex.core.errors import FatalBackendError

logger = logging.getLogger(__name__)

# A guard against a hung child, not a performance limit: all-MiniLM-L6-v2 exports in ~10 s, and
# a large encoder on a slow CPU in minutes.
EXPORT_TIMEOUT_S = 1800.0


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedplex"


def unwritable(cache_dir: Path) -> str | None:
    """Why exports cannot be written into ``cache_dir`` (None: they can). Checked at start
    (``serve/server.py``) and before an export."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as exc:
        return (
            f"the ONNX cache directory {cache_dir} is not writable ({exc.strerror or exc}): "
            "point --cache-dir (EMBEDPLEX_CACHE_DIR) at a writable directory"
        )
    return None


def has_exports(cache_dir: Path) -> bool:
    """Whether ``cache_dir`` holds any finished export (a read-only one may serve them)."""
    return any((cache_dir / "onnx").glob("*/model.onnx"))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def cache_key(model_dir: Path, dtype: str, task: str = "embedding") -> str:
    # Versions come from package metadata: the server never imports torch (onnx_export.py).
    parts = [
        model_hash(model_dir),
        dtype,
        task,
        EXPORT_FORMAT,
        str(OPSET),
        _version("torch"),
        _version("onnx"),
        _version("onnxruntime"),
    ]
    if dtype == "int8":
        parts.append(INT8_FORMAT)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def ensure_onnx(
    spec: ModelSpec,
    *,
    dtype: str,
    cache_dir: Path,
    threads: int | None = None,
    min_quality: float = 0.0,
    timeout: float = EXPORT_TIMEOUT_S,
    replace: bool = False,
) -> tuple[Path, bool]:
    """Return the path of a ready ONNX file for ``dtype`` and whether it came from the cache.

    For int8 the child measures the minimum cosine against float32 (``int8_gate.py``, on
    ``threads``); below ``min_quality`` the export is refused and nothing is cached. A cached
    int8 entry is used only if its measure (``quality.json``) holds ``min_quality``; else it is
    exported again with this gate, as a cold cache would, and replaced if that passes.
    ``replace``: the cached entry failed to load; export it again and replace it.
    """
    key = cache_key(spec.path, dtype, spec.kind.value)
    entry = cache_dir / "onnx" / key
    final = entry / "model.onnx"
    if not replace and _usable(entry, dtype, min_quality, spec.model_id, quiet=True):
        return final, True
    problem = unwritable(cache_dir)
    if problem is not None:
        raise FatalBackendError(
            f"the ONNX export of {spec.model_id} ({dtype}) is not cached yet, and {problem}"
        )
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Beside onnx/, not in it: onnx/ holds finished entries only.
    with _export_lock(cache_dir / f".export-{key}.lock"):
        # Another process may have exported it while this one waited.
        if not replace and _usable(entry, dtype, min_quality, spec.model_id, quiet=False):
            return final, True
        for stale in cache_dir.glob(f".export-{key}-*"):  # left by a process killed mid-export
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".export-{key}-"))
        try:
            if dtype == "float32" and spec.onnx_file is not None:
                # A copy of the model's own files: nothing heavy to import, so no child.
                (work / "out").mkdir()
                copy_onnx(spec.path, work / "out")
            else:
                logger.info(
                    "exporting %s to ONNX (%s) in a child process, once; cached under %s",
                    spec.model_id,
                    dtype,
                    entry,
                )
                command = export_command(
                    spec, work, dtype=dtype, threads=threads, min_quality=min_quality
                )
                _run_export(command, timeout=timeout, what=f"{spec.model_id} ({dtype})")
            out = work / "out"
            if not (out / "model.onnx").is_file():
                raise FatalBackendError(
                    f"the ONNX export of {spec.model_id} exited 0 but wrote no model.onnx"
                )
            _publish(out, entry, work / "replaced")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final, False


def _usable(entry: Path, dtype: str, min_quality: float, model_id: str, *, quiet: bool) -> bool:
    """Whether a cached entry can be served: it has its graph, and an int8 one its measured
    quality at ``min_quality`` or above (an entry exported under a laxer gate, or missing its
    record, is not). ``quiet``: say nothing (the check before the lock, made again under it)."""
    if not (entry / "model.onnx").is_file():
        if entry.exists() and not quiet:
            logger.warning("the cached ONNX entry %s has no model.onnx: exporting again", entry)
        return False
    if dtype != "int8":
        return True
    quality = _measured(entry)
    if quality is not None and quality >= min_quality:
        return True
    if not quiet:
        measured = "no record" if quality is None else f"{quality:.5f}"
        logger.warning(
            "the cached int8 export of %s measured min cosine %s against float32, under the "
            "%s required: exporting again with this gate",
            model_id,
            measured,
            min_quality,
        )
    return False


def _measured(entry: Path) -> float | None:
    """The min cosine an int8 entry's export measured (None: no readable record)."""
    try:
        record = json.loads((entry / "quality.json").read_text())
        return float(record["min_cosine"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _publish(out: Path, entry: Path, aside: Path) -> None:
    """Rename ``out`` into place as ``entry``, durably. Called under the key's lock: an entry
    already there is one this process found unusable, so it is moved to ``aside`` (in the work
    directory, removed with it) first."""
    for file in out.iterdir():
        _fsync(file)
    _fsync(out)
    if entry.exists():
        entry.rename(aside)
    try:
        out.rename(entry)
    except OSError:
        if not (entry / "model.onnx").is_file():  # else a process outside the lock won the race
            raise
    _fsync(entry.parent)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data to disk: a rename is durable only after both."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _export_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (released by the kernel if this process dies).

    The wait is bounded: the holder's child is killed after its timeout."""
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process's ONNX export (%s)", path.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export_command(
    spec: ModelSpec, work: Path, *, dtype: str, threads: int | None, min_quality: float
) -> list[str]:
    """The child's command line: this interpreter, the exporter module, the resolved spec."""
    command = [sys.executable, "-m", "embedplex.backends.onnx_export", str(spec.path), str(work)]
    command += ["--dtype", dtype, "--pooling", spec.pooling.value]
    command += ["--max-length", str(spec.max_input_length), "--min-cosine", repr(min_quality)]
    if threads:
        command += ["--threads", str(threads)]
    return [*command, "--watch-parent"]


def _run_export(command: list[str], *, timeout: float, what: str) -> None:
    """Run the export child to its end; ``FatalBackendError`` naming the exit code and the
    child's reason when it fails, or when it outlives ``timeout`` (then it is killed)."""
    ended = run_child(command, timeout=timeout, log=logger, label="export child")
    if ended.code is None:
        raise FatalBackendError(
            f"exporting {what} to ONNX timed out after {timeout:g} s; the child was killed "
            f"(its last output: {ended.reason})"
        )
    if ended.code != 0:
        raise FatalBackendError(
            f"exporting {what} to ONNX failed in its child process ({ended.status()}): "
            f"{ended.reason}"
        )
