"""What an embedding depends on, as cache keys.

In this process the key is a plain tuple (``memory.py`` says why); across replicas it is a
BLAKE2b digest of the same fields plus what names the model instance (model id, revision,
pooling, engine, dtype, input cap), so replicas that serve the same name from different files
or engines never share an entry. A digest keeps texts out of Redis and keys short.
"""

from __future__ import annotations

import struct
from hashlib import blake2b

import numpy as np

from embedplex.core.types import Vector

PREFIX = "embedplex:emb:v1:"
_TOKENS = struct.Struct("<I")

# An in-process key: (text, or the token ids as a tuple; truncate; truncate from the left;
# the model instance's tag). Texts and id tuples never compare equal, so they cannot collide.
MemoryKey = tuple[str | tuple[int, ...], bool, bool, int]


def model_identity(*fields: object) -> bytes:
    """The fields that name one model instance, joined unambiguously (for ``redis_key``)."""
    return b"\x00".join(str(f).encode() for f in fields)


def redis_key(identity: bytes, key: MemoryKey) -> str:
    source, truncate, left, _ = key
    h = blake2b(identity, digest_size=16)
    h.update(b"\x01T" if truncate else b"\x01F")
    h.update(b"L" if left else b"R")
    if isinstance(source, str):
        h.update(b"s")
        h.update(source.encode("utf-8", "surrogatepass"))
    else:
        h.update(b"i")
        h.update(np.asarray(source, dtype=np.int64).tobytes())
    return PREFIX + h.hexdigest()


def pack(raw: Vector, tokens: int) -> bytes:
    """The value stored in Redis: the token count, then the raw (unnormalized) float32 vector."""
    return _TOKENS.pack(tokens) + raw.astype("<f4", copy=False).tobytes()


def unpack(value: bytes, dim: int) -> tuple[Vector, int] | None:
    """``pack``'s inverse; None for a value of another shape (another model wrote it)."""
    if len(value) != _TOKENS.size + 4 * dim:
        return None
    (tokens,) = _TOKENS.unpack_from(value)
    raw = np.frombuffer(value, dtype="<f4", offset=_TOKENS.size).astype(np.float32, copy=False)
    return raw, tokens
