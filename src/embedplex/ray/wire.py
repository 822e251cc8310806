"""What a Ray replica sends back to the gateway (pickled by Ray between processes).

A replica answers with one float32 matrix rather than ``EmbedResult``'s list of vectors: one
buffer pickles (and crosses the object store) far more cheaply than hundreds of small arrays.
Errors the caller should see (``EmbedplexError``: 4xx, 429, a queue timeout) come back as
values, not raised, so that they reach the gateway as the same class with the same message
rather than wrapped in Ray's task error. This module imports no Ray: the gateway reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from embedplex.core.types import Timings

# The deployment's name inside each Serve application (the app is named per model).
DEPLOYMENT = "EmbedplexReplica"


def app_name(model: str) -> str:
    """The Serve application that serves model ``model`` (the gateway attaches to it by name)."""
    return f"embedplex-{model}"


@dataclass(slots=True)
class EmbedAnswer:
    matrix: npt.NDArray[np.float32]  # (inputs, dim), in input order
    prompt_tokens: int
    timings: Timings
    replica: str  # the Serve replica that answered (requests per replica in the status)


@dataclass(slots=True)
class RerankAnswer:
    scores: list[float]
    prompt_tokens: int
    timings: Timings
    replica: str
