"""A model's files from the Hugging Face hub: fetched in a child process, within a deadline.

``fetch`` runs ``python -m embedplex.backends.hub`` (``child.py``), which downloads what serving
reads into huggingface_hub's cache (``HF_HOME``, ``HF_HUB_CACHE``; ``HF_ENDPOINT`` for mirrors)
and names the snapshot directory. Why a child, not a thread: huggingface_hub (0.x to 2.x)
sends its repo listing with no timeout at all, and 2.x retries a file for as long as each try
brings some bytes (a mirror that cuts a file at the same byte every time is retried for good);
its download threads are not daemons, so a stalled one held the process after Ctrl-C, and a
thread cannot be stopped. A child killed at ``hub_timeout_s`` takes its threads and sockets
with it, ends itself when the server goes (its stdin closes), and its progress bars and
request logs never reach the server's stderr (only its log lines, credentials masked, are
relayed). Each of its requests without a timeout of its own gets ``HF_HUB_DOWNLOAD_TIMEOUT``
(huggingface_hub's, default 10 s), so a hub that stops answering fails in seconds, not at the
deadline. It works with every huggingface_hub that pyproject allows (``_bound_requests``):
0.x (requests; transformers 4 needs it), 1.x (httpx), 2.x (httpx2).

``snapshot`` is the download itself; offline (``cached``) it runs in the server's process.
"""

from __future__ import annotations

import argparse
import errno
import glob
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from embedplex.backends.child import (
    REFUSED,
    child_env,
    child_logging,
    exit_with_parent,
    run_child,
)
from embedplex.backends.model_json import read_list
from embedplex.backends.st_modules import pooling_config_name
from embedplex.core.errors import FatalBackendError
from embedplex.core.faults import fault
from embedplex.core.redact import redact_url, redact_urls

# By name: run with ``-m``, this module's ``__name__`` is ``__main__``.
logger = logging.getLogger("embedplex.backends.hub")

# The longest one model's hub resolve (listing and download) may take. It only bounds a
# download that never ends (a mirror that cuts a file at the same byte, retried for good): a hub
# that stops answering fails long before, at its first unanswered request's timeout
# (HF_HUB_DOWNLOAD_TIMEOUT), and a slow healthy download must not fail. An hour: 36 GB (an
# 8B-parameter model in float32, or twice that in float16) at 10 MB/s fits; the 15 minutes it
# was failed a 28 GB download at 30 MB/s (15.5 minutes).
HUB_TIMEOUT_S = 3600.0

# What serving reads from a hub repo, by exact name: ``load_spec``'s files, the ``Pooling``
# module's config (in ``1_Pooling``, where sentence-transformers puts it; a repo whose
# modules.json names another folder gets it in a second call), and an ONNX export with its
# external data (``model.onnx`` is the only graph served, so its siblings in ``onnx/`` stay on
# the hub). Exact names, because huggingface_hub matches with ``fnmatch``, whose ``*`` crosses
# ``/``: "*.json" fetched every results/*.json, checkpoint-*/ and onnx/ copy of the tokenizer.
_HUB_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "onnx/model.onnx",
    "onnx/model.onnx_data",
    "onnx/model.onnx.data",
]
# What transformers' ``from_pretrained`` reads besides config.json: one file or an index and
# its shards.
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
# transformers reads these only where a repo has no safetensors: fetched only then.
_PYTORCH_BIN = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]
# Never code: nothing here runs a repo's ``*.py``. Never weights in a folder: the shard
# patterns' ``*`` would match "model-x/y-of-z.safetensors" too, and transformers reads only the
# top level.
_NEVER = ["*.py", "*/*.safetensors", "*/*.bin"]


class HubError(Exception):
    """The hub download failed; the text is one line, credentials masked. ``timed_out``: it
    outlived ``hub_timeout_s`` and was stopped."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def endpoint() -> str:
    """The hub this process's children ask (``HF_ENDPOINT``), safe to show."""
    return redact_url(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


def fetch(model_id: str, revision: str | None, *, timeout_s: float = HUB_TIMEOUT_S) -> Path:
    """The snapshot directory of what serving reads of ``model_id``, downloaded in a child
    killed after ``timeout_s``. ``FatalBackendError``: a file it brought is wrong (modules.json);
    ``HubError``: the download failed or timed out. The child writes its outcome, a path or an
    error, as JSON into a pipe of its own (its output is log lines): nothing on disk to clean
    up when this process is stopped meanwhile."""
    command = [sys.executable, "-m", "embedplex.backends.hub", model_id]
    if revision is not None:
        command += ["--revision", revision]
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        command.append("--debug")  # the failure's traceback, for whoever asked for it
    env = child_env({"HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    readable, writable = os.pipe()
    try:
        command += ["--result-fd", str(writable), "--watch-parent"]
        ended = run_child(
            command, timeout=timeout_s, log=logger, label="hub", env=env, pass_fds=(writable,)
        )
        os.close(writable)  # the child's copy is closed: reading ends at what it wrote
        writable = -1
        with os.fdopen(readable) as pipe:
            readable = -1
            written = pipe.read()
    finally:
        for fd in (readable, writable):
            if fd >= 0:
                os.close(fd)
    try:
        outcome = json.loads(written) if written else {}
    except ValueError:  # cut off as it was written: the child was killed then
        outcome = {}
    if "path" in outcome:
        return Path(outcome["path"])
    if "error" in outcome:  # what huggingface_hub raised, which may quote the URL it asked
        error = redact_urls(outcome["error"])
        raise FatalBackendError(error) if outcome.get("refused") else HubError(error)
    if ended.code is None:
        raise HubError(
            f"the hub ({endpoint()}) did not finish within hub_timeout_s ({timeout_s:g} s); "
            f"the download was stopped (its last output: {ended.reason})",
            timed_out=True,
        )
    raise HubError(f"the download's child process failed ({ended.status()}): {ended.reason}")


def cached(model_id: str, revision: str | None, cache_dir: Path | None = None) -> Path | None:
    """The model in huggingface_hub's cache (or ``cache_dir``), offline; None: not there."""
    try:
        return snapshot(model_id, revision, cache_dir, offline=True)
    except FatalBackendError:
        raise
    except Exception as exc:
        if fault(exc) is not None:  # a bug, not a model missing from the cache
            raise
        where = cache_dir or "huggingface_hub's cache"
        logger.debug("%s is not in %s: %s", model_id, where, exc)
        return None


def snapshot(
    model_id: str, revision: str | None, cache_dir: Path | None = None, *, offline: bool = False
) -> Path:
    """What serving reads of a hub repo, in at most two calls: the second one, pinned to the
    commit the first resolved (a branch may move in between), fetches ``pytorch_model.bin``
    where there is no safetensors and the ``Pooling`` config where modules.json names a folder
    other than ``1_Pooling``."""
    resolved = _download(model_id, revision, [*_HUB_FILES, *_SAFETENSORS], cache_dir, offline)
    more = [] if any(resolved.glob("*.safetensors")) else list(_PYTORCH_BIN)
    pooling = pooling_config_name(read_list(resolved / "modules.json"))
    if pooling is not None and not (resolved / pooling).is_file():
        more.append(glob.escape(pooling))  # a name, not a pattern
    if more:
        pinned = resolved.name if resolved.parent.name == "snapshots" else revision
        resolved = _download(model_id, pinned, more, cache_dir, offline)
    return resolved


def _download(
    model_id: str,
    revision: str | None,
    patterns: list[str],
    cache_dir: Path | None,
    offline: bool,
) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model_id,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=_NEVER,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    )


# -- the child -----------------------------------------------------------------------------


class _Listings:
    """The hub's answers to the repo's own listing requests (``/api/models/{repo_id}/...``:
    repo info, file tree): where one went unanswered, or answered an error, and the download
    still worked, huggingface_hub served the copy in its cache, which it does without a word.
    Its other ``/api/`` requests are best-effort (2.5 asks ``/api/agent-harnesses`` first,
    which a mirror answers 404) and say nothing about the copy served."""

    def __init__(self, repo_id: str) -> None:
        self.asked = 0
        self.answered = 0
        self.error: str | None = None
        self._route = re.compile(rf"/api/(?:models|datasets|spaces)/{re.escape(repo_id)}(?:/|$)")

    def counts(self, path: str) -> bool:
        return self._route.search(path) is not None

    def sent(self, path: str) -> None:
        if self.counts(path):
            self.asked += 1

    def received(self, path: str, status: int) -> None:
        if not self.counts(path):
            return
        if status < 400:
            self.answered += 1
        else:
            self.error = f"HTTP {status}"


def _bound_requests(repo_id: str) -> _Listings:
    """huggingface_hub's requests, whatever its version: each one sent without a timeout gets
    ``HF_HUB_DOWNLOAD_TIMEOUT`` (its listings have none: a hub that accepts and never answers
    held the start for good), and the repo's listings are noted. 1.x and 2.x share one httpx
    (httpx2) client with event hooks; 0.x (requests, which transformers 4 needs) has one
    session per thread and no request hook: the listings go from this thread, whose session's
    ``request`` is wrapped. File downloads have had their own timeouts in every version."""
    from huggingface_hub import constants, get_session

    listings = _Listings(repo_id)
    timeout = float(getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10))
    session = get_session()
    if hasattr(session, "event_hooks"):
        _hook_httpx(session, listings, timeout)
    else:
        _wrap_requests(session, listings, timeout)
    return listings


def _hook_httpx(client: Any, listings: _Listings, timeout: float) -> None:
    def request(request: Any) -> None:
        # httpx's timeout extension, as ``Timeout(timeout).as_dict()`` writes it.
        bound = request.extensions.get("timeout") or {}
        if all(value is None for value in bound.values()):
            request.extensions["timeout"] = dict.fromkeys(_TIMEOUT_KEYS, timeout)
        listings.sent(request.url.path)

    def response(response: Any) -> None:
        listings.received(response.request.url.path, response.status_code)

    hooks = client.event_hooks
    client.event_hooks = {
        "request": [*hooks.get("request", ()), request],
        "response": [*hooks.get("response", ()), response],
    }


_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def _wrap_requests(session: Any, listings: _Listings, timeout: float) -> None:
    send = session.request

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if not args and kwargs.get("timeout") is None:  # only keywords follow url in practice
            kwargs["timeout"] = timeout
        path = urlsplit(url).path
        listings.sent(path)
        response = send(method, url, *args, **kwargs)
        listings.received(path, response.status_code)
        return response

    session.request = request


# What writing into huggingface_hub's cache fails with where it cannot be written: a read-only
# mount, permissions, a file where a directory should be.
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


def _one_line(exc: BaseException) -> str:
    """What failed, in one line (huggingface_hub's messages run over several). A hub that did
    not answer is said so: huggingface_hub's own words are a paragraph around the cause."""
    cause = exc.__cause__
    if isinstance(cause, _transport_errors()):
        return f"the hub ({endpoint()}) did not answer: {type(cause).__name__}: {cause}"
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE:
        return (
            f"huggingface_hub's cache is not writable ({exc.strerror}: {exc.filename}): point "
            "HF_HOME (or HF_HUB_CACHE) at a writable directory"
        )
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP library of this huggingface_hub raises when the hub does not answer:
    httpx2's (2.x), httpx's (1.x) or requests' (0.x). Only a library already imported can have
    raised one: none is imported here."""
    found: list[type[BaseException]] = []
    for module, names in _TRANSPORT_ERRORS:
        library = sys.modules.get(module)
        found += [getattr(library, name) for name in names if hasattr(library, name)]
    return tuple(found)


_TRANSPORT_ERRORS = (
    ("httpx2", ("TransportError",)),
    ("httpx", ("TransportError",)),
    ("requests", ("ConnectionError", "Timeout")),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedplex.backends.hub",
        description="Download what serving reads of a hub repo; write its directory to RESULT "
        "(the server runs this).",
    )
    parser.add_argument("model_id")
    parser.add_argument("--result-fd", type=int, required=True, help="where the outcome goes")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--debug", action="store_true", help="log a failure's traceback")
    parser.add_argument("--watch-parent", action="store_true", help="exit when stdin closes")
    args = parser.parse_args(argv)
    child_logging()
    for name in ("httpx", "httpx2"):  # a line per request, the URL's userinfo and all
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.watch_parent:
        exit_with_parent()
    listings = _bound_requests(args.model_id)
    try:
        path = snapshot(args.model_id, args.revision)
    except FatalBackendError as exc:
        _log_failure(exc, exc.message, args.debug)
        _outcome(args.result_fd, error=exc.message, refused=True)
        return REFUSED
    except Exception as exc:
        _log_failure(exc, _one_line(exc), args.debug)
        _outcome(args.result_fd, error=_one_line(exc))
        return 1
    if listings.asked > listings.answered:
        logger.warning(
            "%s: the hub (%s) did not answer its listing (%s); serving the copy in "
            "huggingface_hub's cache (commit %s), which may be older than the hub's",
            args.model_id,
            endpoint(),
            listings.error or "no answer",
            path.name,
        )
    _outcome(args.result_fd, path=str(path))
    return 0


def _log_failure(exc: BaseException, line: str, debug: bool) -> None:
    """A fault in code (``core/faults.py``) logs its traceback at ERROR, which the server
    relays into its own log: the outcome carries one line, and the server can only say that.
    A failure the operator fixes (no such repo, no answer) is that line alone; its traceback
    only with ``--debug``."""
    if fault(exc) is not None:
        logger.error("the download failed: %s", line, exc_info=exc)
    elif debug:
        logger.info("%s", line, exc_info=exc)


def _outcome(fd: int, **outcome: object) -> None:
    """Write the outcome for ``fetch``: cut to well within a pipe's buffer, which the server
    reads only once this process has ended."""
    if isinstance(error := outcome.get("error"), str) and len(error) > _ERROR_CHARS:
        outcome["error"] = error[:_ERROR_CHARS] + "..."
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(outcome))


_ERROR_CHARS = 2000


if __name__ == "__main__":
    sys.exit(main())
