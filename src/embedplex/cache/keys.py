"""What an embedding depends on, as cache keys.

In this process the key is a plain tuple (``memory.py`` says why); across replicas it is a
BLAKE2b digest of the same fields plus what names the model instance (model id, revision,
pooling, engine, dtype, input cap), so replicas that serve the same name from different files
or engines never share an entry. A digest keeps texts out of Redis and keys short.

A remote provider's entries (``providers/cached.py``) are keyed the same way: in this process
``(text, tag)``, the tag naming the provider's identity and request parameters; in Redis a
digest of that identity and the text (``remote_key``). Their values carry the token share as a
float (``pack_remote``), since an upstream bills tokens per call and each text gets its share.
"""

from __future__ import annotations

import struct
from hashlib import blake2b

import numpy as np

from embedplex.core.types import Vector

PREFIX = "embedplex:emb:v1:"
_TOKENS = struct.Struct("<I")
_SHARE = struct.Struct("<d")

# An in-process key: (text, or the token ids as a tuple; truncate; truncate from the left;
# the model instance's tag). Texts and id tuples never compare equal, so they cannot collide.
MemoryKey = tuple[str | tuple[int, ...], bool, bool, int]
# A remote provider's in-process key: (text, the tag of its provider identity and parameters).
# Two fields, where a local key has four: the two kinds never compare equal.
RemoteKey = tuple[str, int]


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


def remote_base(identity: bytes) -> blake2b:
    """The digest state of one provider identity, copied for each text (``remote_key``)."""
    return blake2b(b"remote\x00" + identity, digest_size=16)


def remote_key(base: blake2b, text: str) -> str:
    """The Redis key of ``text`` under a provider identity (``remote_base``)."""
    h = base.copy()
    h.update(b"\x01s")
    h.update(text.encode("utf-8", "surrogatepass"))
    return PREFIX + h.hexdigest()


def pack_remote(vector: Vector, tokens: float) -> bytes:
    """A remote entry in Redis: the text's share of its call's tokens, then the float32 vector."""
    return _SHARE.pack(tokens) + vector.astype("<f4", copy=False).tobytes()


def unpack_remote(value: bytes) -> tuple[Vector, float] | None:
    """``pack_remote``'s inverse (a read-only vector); None for a value of another shape."""
    size = len(value) - _SHARE.size
    if size <= 0 or size % 4:
        return None
    (tokens,) = _SHARE.unpack_from(value)
    vector = np.frombuffer(value, dtype="<f4", offset=_SHARE.size).astype(np.float32, copy=False)
    return vector, tokens
