"""A failure the operator fixes, or a fault in code: one line, or a traceback.

A model that cannot load says why in one line (``observability.logs.log_failure``): a path, a
setting, a model's files, a hub that did not answer. Its traceback, 50-100 lines of where in the
code the reason was found, buried the line that said it. A fault in code (an ``AttributeError``
deep in a library, a ``TypeError`` of ours) is the other way round: its one line says nothing
anyone can act on, and its traceback is what a bug report needs. The loaders wrap every
failure as a ``FatalBackendError`` (``raise ... from exc``), so the one line is only right when
nothing in the chain of causes is a fault.
"""

from __future__ import annotations

from embedplex.core.errors import EmbedplexError

# What reports a failure outside the code: ours (the reason, already said), the system's (a
# file, a socket, a cache that cannot be written: requests' errors are OSErrors too), a value
# that a library refused (a repo id, a JSON file, a model config), a missing extra, no memory.
_REPORTS: tuple[type[BaseException], ...] = (
    EmbedplexError,
    OSError,
    ValueError,
    ImportError,
    MemoryError,
)

# Libraries whose own exception classes report what they found, never a fault of the caller:
# the hub client and each of its HTTP stacks, down to the wire (a 404 repo or revision, a gated
# repo, no answer: huggingface_hub's error is caused by httpx2's, caused by httpcore2's), ONNX
# Runtime (a damaged graph), safetensors (a damaged weights file), torch (out of memory). A
# builtin error raised inside them (AttributeError, TypeError) is still a fault.
_REPORTING_LIBRARIES = frozenset(
    {
        "huggingface_hub",
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "h11",
        "h2",
        "requests",
        "urllib3",
        "onnxruntime",
        "safetensors",
        "tokenizers",
        "torch",
    }
)


def fault(exc: BaseException) -> BaseException | None:
    """The first fault in code in ``exc`` and its explicit causes (``raise ... from``), or None
    where each of them reports a failure the operator can act on. Implicit contexts are not
    followed: an error raised while handling an expected one (``except KeyError: raise
    FatalBackendError(...)``) is that error's translation, not a second failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not _reports(current):
            return current
        current = current.__cause__
    return None


def _reports(exc: BaseException) -> bool:
    kind = type(exc)
    if isinstance(exc, _REPORTS) or kind is Exception:  # tokenizers raise a bare Exception
        return True
    return kind.__module__.partition(".")[0] in _REPORTING_LIBRARIES
