"""What the gateway and a Ray replica send each other (pickled by Ray between processes).

A replica answers with flat arrays rather than lists of small objects: one float32 matrix for an
embed (not ``EmbedResult``'s list of vectors), one matrix and its row lengths for ``/embed_all``,
one array per token field for ``/tokenize``. One buffer pickles (and crosses the object store)
far more cheaply than hundreds of small arrays or thousands of small objects. Errors the caller
should see (``EmbedplexError``: 4xx, 429, a queue timeout) come back as values, not raised, so
that they reach the gateway as the same class with the same message rather than wrapped in
Ray's task error. This module imports no Ray: the gateway reads it.

Versions. Gateways and replicas of different releases meet: a gateway attaches to an
application another release deployed, and Serve upgrades replicas one by one. So a class here
never changes its fields (a slotted dataclass pickles as its values in order); a new operation
is a new replica method with its own call and answer classes, and ``WIRE_VERSION`` goes up.
The gateway asks a replica's ``wire_version`` (a replica too old to have that method is
version 1) and refuses, with a clear error, an operation newer than the replicas it reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from embedplex.backends.tokenizer import Token
from embedplex.core.types import Timings

# 1: info, embed, rerank, stats. 2: wire_version, tokenize, embed_all, decode.
WIRE_VERSION = 2

# The first wire version whose replicas have each method (a method not named here: version 1).
SINCE: dict[str, int] = {"tokenize": 2, "embed_all": 2, "decode": 2}

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


@dataclass(slots=True)
class TokenizeCall:
    """TEI ``/tokenize``: the arguments of ``Tokenizing.tokenize``."""

    texts: list[str]
    add_special_tokens: bool
    prompt_name: str | None


@dataclass(slots=True)
class TokensAnswer:
    """Every input's tokens, flattened: ``lengths[i]`` tokens of input ``i``, then the next's.

    ``starts`` and ``stops`` are -1 where the token has no offsets (a special token).
    """

    lengths: npt.NDArray[np.int32]
    ids: npt.NDArray[np.int64]
    special: npt.NDArray[np.bool_]
    starts: npt.NDArray[np.int32]
    stops: npt.NDArray[np.int32]
    texts: list[str]  # each token's text
    replica: str

    @classmethod
    def pack(cls, rows: list[list[Token]], replica: str) -> TokensAnswer:
        flat = [t for row in rows for t in row]
        return cls(
            lengths=np.array([len(row) for row in rows], np.int32),
            ids=np.array([t.id for t in flat], np.int64),
            special=np.array([t.special for t in flat], np.bool_),
            starts=np.array([-1 if t.start is None else t.start for t in flat], np.int32),
            stops=np.array([-1 if t.stop is None else t.stop for t in flat], np.int32),
            texts=[t.text for t in flat],
            replica=replica,
        )

    def rows(self) -> list[list[Token]]:
        """The tokens as ``Tokenizing.tokenize`` returns them."""
        tokens = [
            Token(
                id=i,
                text=text,
                special=special,
                start=None if start < 0 else start,
                stop=None if stop < 0 else stop,
            )
            for i, text, special, start, stop in zip(
                self.ids.tolist(),
                self.texts,
                self.special.tolist(),
                self.starts.tolist(),
                self.stops.tolist(),
                strict=True,
            )
        ]
        out: list[list[Token]] = []
        at = 0
        for n in self.lengths.tolist():
            out.append(tokens[at : at + n])
            at += n
        return out


@dataclass(slots=True)
class TokenEmbedAnswer:
    """TEI ``/embed_all``: every input's token vectors stacked, ``lengths[i]`` rows each."""

    matrix: npt.NDArray[np.float32]  # (tokens of every input, dim)
    lengths: npt.NDArray[np.int32]
    prompt_tokens: int
    timings: Timings
    replica: str

    @classmethod
    def pack(
        cls,
        vectors: list[npt.NDArray[np.float32]],
        prompt_tokens: int,
        timings: Timings,
        replica: str,
    ) -> TokenEmbedAnswer:
        dim = vectors[0].shape[1] if vectors else 0
        matrix = (
            np.concatenate(vectors).astype(np.float32, copy=False)
            if vectors
            else np.empty((0, dim), np.float32)
        )
        lengths = np.array([len(v) for v in vectors], np.int32)
        return cls(matrix, lengths, prompt_tokens, timings, replica)

    def vectors(self) -> list[npt.NDArray[np.float32]]:
        """One (tokens, dim) array per input: views of the one matrix."""
        if not len(self.lengths):
            return []
        return list(np.split(self.matrix, np.cumsum(self.lengths)[:-1]))


@dataclass(slots=True)
class DecodeCall:
    """TEI ``/decode``: the arguments of ``Decoding.decode``."""

    sequences: list[list[int]]
    skip_special_tokens: bool


@dataclass(slots=True)
class DecodeAnswer:
    texts: list[str]
    replica: str


# Every answer names the replica that gave it.
Answer = EmbedAnswer | RerankAnswer | TokensAnswer | TokenEmbedAnswer | DecodeAnswer
