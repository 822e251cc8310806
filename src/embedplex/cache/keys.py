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

# An in-process key: (text, or the token ids after truncation as int32 bytes (``ids_key``);
# truncate; truncate from the left; the model instance's tag). A str never equals bytes, so
# texts and ids cannot collide.
MemoryKey = tuple[str | bytes, bool, bool, int]
# A remote entry's token share is refused past this many tokens per character of its text
# (plus the slack): a text's share of its call is its length times the call's tokens per
# character, which a byte-level tokenizer's worst case (4 bytes a character) with special
# tokens keeps under 8.
_SHARE_PER_CHAR = 16
_SHARE_SLACK = 1024
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
    else:  # "I": the truncated ids as int32 ("i" was all of them as int64: never the same)
        h.update(b"I")
        h.update(source)
    return PREFIX + h.hexdigest()


def ids_key(ids: list[int]) -> bytes:
    """Token ids (checked against the vocabulary and truncated) as a key: 4 bytes an id, the
    size ``sys.getsizeof`` charges (a tuple's would count its pointers, not its ints)."""
    return np.asarray(ids, dtype=np.int32).tobytes()


def pack(raw: Vector, tokens: int) -> bytes:
    """The value stored in Redis: the token count, then the raw (unnormalized) float32 vector."""
    return _TOKENS.pack(tokens) + raw.astype("<f4", copy=False).tobytes()


def unpack(value: bytes, dim: int, max_tokens: int) -> tuple[Vector, int] | None:
    """``pack``'s inverse; None for a value no model of this shape would have written: another
    length, more tokens than ``max_tokens`` (the model's input cap), or a NaN or infinity."""
    if len(value) != _TOKENS.size + 4 * dim:
        return None
    (tokens,) = _TOKENS.unpack_from(value)
    if tokens > max_tokens:
        return None
    raw = np.frombuffer(value, dtype="<f4", offset=_TOKENS.size).astype(np.float32, copy=False)
    return (raw, tokens) if np.isfinite(raw).all() else None


def remote_base(identity: bytes) -> blake2b:
    """The digest state of one provider identity, copied for each text (``remote_key``)."""
    return blake2b(b"remote\x00" + identity, digest_size=16)


def remote_key(base: blake2b, text: str) -> str:
    """The Redis key of ``text`` under a provider identity (``remote_base``)."""
    h = base.copy()
    h.update(b"\x01s")
    h.update(text.encode("utf-8", "surrogatepass"))
    return PREFIX + h.hexdigest()


def remote_dim_key(base: blake2b) -> str:
    """The Redis key of the vector length a provider identity's upstream answers: a replica
    that has not called it yet checks the values it reads against it (``providers/cached.py``).
    Never a text's key: those hash ``\x01s`` where this hashes ``\x01d``."""
    h = base.copy()
    h.update(b"\x01d")
    return PREFIX + h.hexdigest()


def unpack_dim(value: bytes | None) -> int:
    """The length a ``remote_dim_key`` holds (ASCII digits), or 0 for none or a bad one."""
    if value is None or not value.isdigit() or len(value) > 6:
        return 0
    return int(value)


def pack_remote(vector: Vector, tokens: float) -> bytes:
    """A remote entry in Redis: the text's share of its call's tokens, then the float32 vector."""
    return _SHARE.pack(tokens) + vector.astype("<f4", copy=False).tobytes()


def unpack_remote(value: bytes, dim: int, text: str) -> tuple[Vector, float] | None:
    """``pack_remote``'s inverse (a read-only vector); None for a value the upstream cannot
    have answered for ``text``: a vector of other than ``dim`` floats or with a NaN or infinity,
    or a token share that is not finite or is outside [0, ``max_share(text)``]."""
    if dim < 1 or len(value) != _SHARE.size + 4 * dim:
        return None
    (tokens,) = _SHARE.unpack_from(value)
    if not 0.0 <= tokens <= max_share(text):  # False for NaN too
        return None
    vector = np.frombuffer(value, dtype="<f4", offset=_SHARE.size).astype(np.float32, copy=False)
    return (vector, tokens) if np.isfinite(vector).all() else None


def max_share(text: str) -> float:
    """The most tokens a text's share of its call can be (``unpack_remote``)."""
    return float(_SHARE_PER_CHAR * len(text) + _SHARE_SLACK)
