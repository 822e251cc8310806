"""The ONNX export cache, keyed by model hash; a missing entry is exported in a child process.

The key covers the weights, the config, the dtype and the exporter's versions, so a second
start reuses the export and a changed model never meets a stale one. The export itself runs in
``python -m embedplex.backends.onnx_export`` (a fresh interpreter, not a fork of this threaded
server), so PyTorch never enters the serving process. One export per key at a time: a lock file
makes a second process wait for the first one's entry instead of exporting it again. The child
writes into a temporary directory that is renamed into place only after it exits 0, so a crash,
a timeout or a refusal never leaves a half-written entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO

import embedplex
from embedplex.backends.model_files import ModelSpec
from embedplex.backends.onnx_export import EXPORT_FORMAT, INT8_FORMAT, OPSET
from embedplex.core.errors import FatalBackendError

logger = logging.getLogger(__name__)

# A guard against a hung child, not a performance limit: all-MiniLM-L6-v2 exports in ~10 s, and
# a large encoder on a slow CPU in minutes.
EXPORT_TIMEOUT_S = 1800.0
_TAIL_LINES = 20  # of the child's output, kept for the error when it fails
_REASON_CHARS = 600
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Hashed in this order (a directory with none of the ONNX file hashes as it always did).
_HASHED_FILES = ("config.json", *_WEIGHT_FILES, "onnx/model.onnx")
# model_hash's digests by directory and its files' (size, mtime, inode): loading a model
# hashes its weights once, for its ONNX export and its cache identity alike.
_hashes: dict[tuple[str, tuple[tuple[str, tuple[int, int, int] | None], ...]], str] = {}
_LEVELS = logging.getLevelNamesMapping()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedplex"


def model_hash(model_dir: Path) -> str:
    """SHA-256 of what decides a model's outputs: its config and its weights (safetensors,
    PyTorch, or its own ``onnx/model.onnx``: an ONNX-only directory's weights are that file).

    Keys the ONNX exports and, for a model without a hub revision, its entries in the shared
    embedding cache (``models/local.py``), so it is computed once per process and files: a
    second call with the files' size, mtime and inode unchanged returns the first's digest."""
    files = [(name, model_dir / name) for name in _HASHED_FILES]
    stats = tuple((name, _stat(file)) for name, file in files)
    memo = (str(model_dir), stats)
    known = _hashes.get(memo)
    if known is not None:
        return known
    digest = hashlib.sha256()
    for (name, file), (_, signature) in zip(files, stats, strict=True):
        if signature is not None:
            digest.update(name.encode())
            with file.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
    _hashes[memo] = found = digest.hexdigest()
    return found


def _stat(file: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (None: no such file)."""
    try:
        st = file.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino) if stat.S_ISREG(st.st_mode) else None


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
) -> tuple[Path, bool]:
    """Return the path of a ready ONNX file for ``dtype`` and whether it came from the cache.

    For int8 the child measures the minimum cosine against float32 (``int8_gate.py``, on
    ``threads``); below ``min_quality`` the export is refused and nothing is cached.
    """
    key = cache_key(spec.path, dtype, spec.kind.value)
    entry = cache_dir / "onnx" / key
    final = entry / "model.onnx"
    if final.is_file():
        return final, True
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Beside onnx/, not in it: onnx/ holds finished entries only.
    with _export_lock(cache_dir / f".export-{key}.lock"):
        if final.is_file():  # another process exported it while this one waited
            return final, True
        for stale in cache_dir.glob(f".export-{key}-*"):  # left by a process killed mid-export
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".export-{key}-"))
        try:
            if dtype == "float32" and spec.onnx_file is not None:
                # A copy of the model's own file: nothing heavy to import, so no child.
                (work / "out").mkdir()
                shutil.copyfile(spec.onnx_file, work / "out" / "model.onnx")
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
                run_child(command, timeout=timeout, what=f"{spec.model_id} ({dtype})")
            out = work / "out"
            if not (out / "model.onnx").is_file():
                raise FatalBackendError(
                    f"the ONNX export of {spec.model_id} exited 0 but wrote no model.onnx"
                )
            try:
                out.rename(entry)
            except OSError:
                if not final.is_file():  # else a process outside the lock won the race
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final, False


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


def _child_env() -> dict[str, str]:
    """This process's environment without its settings (and their secrets: the child reads
    none), with this process's embedplex first on the path so that both run the same code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    package_root = str(Path(embedplex.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(command: list[str], *, timeout: float, what: str) -> None:
    """Run the export child to its end, relaying its log into this process's log.

    Raises ``FatalBackendError`` naming the exit code and the child's reason (its last ERROR
    line, else its last line of output) when it fails, or when it outlives ``timeout`` (then it
    is killed)."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,  # closed when this process ends: the child's cue to exit
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_child_env(),
        text=True,
        errors="replace",
    )
    relay = _Relay(proc.stdout)  # type: ignore[arg-type]
    relay.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:  # timed out, or this thread was interrupted
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        relay.join(10)  # output ends with the child, unless a grandchild holds the pipe
        if proc.stdout is not None and not relay.is_alive():
            proc.stdout.close()
    if code is None:
        raise FatalBackendError(
            f"exporting {what} to ONNX timed out after {timeout:g} s; the child was killed "
            f"(its last output: {relay.reason()})"
        )
    if code != 0:
        status = f"exit code {code}"
        if -code in signal.valid_signals():
            status += f", {signal.Signals(-code).name}"  # killed: the OOM killer sends SIGKILL
        raise FatalBackendError(
            f"exporting {what} to ONNX failed in its child process ({status}): {relay.reason()}"
        )


class _Relay(threading.Thread):
    """Reads the child's output: each ``LEVEL:logger:message`` line becomes a record of this
    process's log at that level; other lines (tracebacks, output before logging is set up)
    continue the previous record's level, WARNING before any."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(name="onnx-export-log", daemon=True)
        self._stream = stream
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.last_error: str | None = None

    def run(self) -> None:
        level = logging.WARNING
        for raw in self._stream:
            line = raw.rstrip()
            if not line:
                continue
            name, sep, rest = line.partition(":")
            if sep and name in _LEVELS:
                level, line = _LEVELS[name], rest  # rest: "logger:message"
                if level >= logging.ERROR:
                    self.last_error = rest.partition(":")[2]
            logger.log(level, "export child: %s", line)
            self.tail.append(line)

    def reason(self) -> str:
        text = self.last_error or (self.tail[-1] if self.tail else "no output")
        return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."
