"""Managed API keys: their format, hashing and the operations on the store.

A key reads ``ep_<id>_<secret>``: the prefix makes a leaked key recognizable (secret
scanners, logs), the id names the one row that can verify it (no scan, no hash per stored
key), and the secret is 256 random bits. Only an argon2id hash of the whole key is stored: a
database dump does not give keys back. The secret's entropy, not the hash's cost, is what
stops guessing, so the hash uses a modest memory cost (19 MiB, OWASP's floor for argon2id)
that a verification in the server can afford; verified keys are cached (``cache.py``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Row, insert, select, update
from sqlalchemy.exc import IntegrityError

from embedplex.core.tenant import KeyLimits, Priority, Tenant
from embedplex.state import schema
from embedplex.state.store import StateStore, bump, now, utc

PREFIX = "ep"
_ID_BYTES = 6  # 12 hex digits
_KEY = re.compile(r"^ep_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
IDS_PER_READ = 500  # key ids per statement in ``get_many``


class KeyStoreError(ValueError):
    """A key operation the store refuses (duplicate name, unknown name): the caller's fault."""


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")


def duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w``, ``45s`` (ValueError otherwise)."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: a number and one of s, m, h, d, w (e.g. 90d)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds == 0:  # a lifetime of nothing would be taken as none: a key that never expires
        raise ValueError(f"{text!r}: a duration must be more than 0 (e.g. 90d)")
    if seconds > _LONGEST_S:  # past it, a date out of range (a 500 before, not a 422)
        raise ValueError(f"{text!r}: at most 100 years (36500d)")
    return timedelta(seconds=seconds)


_LONGEST_S = 36_500 * 86_400
LIMIT_MAX = 2**31 - 1  # a key's rpm, tpm, max_concurrent: the store's columns are INTEGER


def split_key(presented: str) -> tuple[str, str] | None:
    """``(key id, secret)`` of a well-formed key, else None."""
    match = _KEY.match(presented)
    return (match.group(1), match.group(2)) if match else None


def new_key(key_id: str) -> str:
    return f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return _hasher.hash(key)


def verify_hash(stored: str, presented: str) -> bool:
    """Whether ``presented`` matches the argon2id hash (costs one hash: ~10-30 ms)."""
    try:
        return _hasher.verify(stored, presented)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored key, without its secret (its hash stays in ``secret_hash``, never shown)."""

    id: str
    name: str
    models: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    priority: str
    weight: int
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_at: datetime | None
    secret_hash: str = ""

    def status(self, at: datetime | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (at or now()):
            return "expired"
        return "active"

    def tenant(self) -> Tenant:
        return Tenant(
            key_id=self.id,
            priority=Priority(self.priority),
            models=self.models,
            limits=KeyLimits(rpm=self.rpm, tpm=self.tpm, max_concurrent=self.max_concurrent),
            weight=self.weight,
        )

    def public(self) -> dict[str, object]:
        """What ``keys list`` and the admin API show: everything but the hash."""
        out = asdict(self)
        del out["secret_hash"]
        out["models"] = list(self.models)
        for field in ("created_at", "expires_at", "revoked_at", "rotated_at"):
            value = out[field]
            out[field] = value.isoformat() if value is not None else None
        out["status"] = self.status()
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySpec:
    """What ``keys create`` asks for."""

    name: str
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    priority: Priority = Priority.INTERACTIVE
    weight: int = 1
    expires_in: timedelta | None = None


def _record(row: Row[Any]) -> KeyRecord:
    m = row._mapping
    created = utc(m["created_at"])
    assert created is not None  # NOT NULL
    return KeyRecord(
        id=m["id"],
        name=m["name"],
        models=tuple(m["models"] or ()),
        rpm=m["rpm"],
        tpm=m["tpm"],
        max_concurrent=m["max_concurrent"],
        priority=m["priority"],
        weight=m["weight"],
        created_at=created,
        expires_at=utc(m["expires_at"]),
        revoked_at=utc(m["revoked_at"]),
        rotated_at=utc(m["rotated_at"]),
        secret_hash=m["secret_hash"],
    )


class KeyStore:
    """Create, read, revoke and rotate keys in a ``StateStore``."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """Store a new key; return it and the key itself (the one time it exists in clear)."""
        if not _NAME.match(spec.name):
            raise KeyStoreError("key names are 1-128 of letters, digits, '.', '_' and '-'")
        key_id = secrets.token_hex(_ID_BYTES)
        key = new_key(key_id)
        created = now()
        values = {
            "id": key_id,
            "name": spec.name,
            "secret_hash": hash_key(key),
            "models": list(spec.models),
            "rpm": spec.rpm,
            "tpm": spec.tpm,
            "max_concurrent": spec.max_concurrent,
            "priority": spec.priority.value,
            "weight": spec.weight,
            "created_at": created,
            "expires_at": None if spec.expires_in is None else created + spec.expires_in,
            "revoked_at": None,
            "rotated_at": None,
        }
        try:
            async with self.store.engine.begin() as conn:
                await conn.execute(insert(schema.api_keys).values(**values))
                await bump(conn)
        except IntegrityError:
            raise KeyStoreError(f"a key named {spec.name!r} exists") from None
        return KeyRecord(**{**values, "models": spec.models}), key  # type: ignore[arg-type]

    async def list(self) -> list[KeyRecord]:
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(select(schema.api_keys).order_by(schema.api_keys.c.name))
            return [_record(r) for r in rows]

    async def get(self, key_id: str) -> KeyRecord | None:
        table = schema.api_keys
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(table).where(table.c.id == key_id))).first()
        return _record(row) if row is not None else None

    async def get_many(self, key_ids: Collection[str]) -> dict[str, KeyRecord]:
        """The rows of ``key_ids`` that exist, by id: one connection, ``IDS_PER_READ`` ids a
        statement (SQLite and asyncpg bound the parameters of one)."""
        table = schema.api_keys
        ids = sorted(key_ids)
        found: dict[str, KeyRecord] = {}
        async with self.store.engine.connect() as conn:
            for start in range(0, len(ids), IDS_PER_READ):
                chunk = ids[start : start + IDS_PER_READ]
                rows = await conn.execute(select(table).where(table.c.id.in_(chunk)))
                found.update((r.id, _record(r)) for r in rows)
        return found

    async def any(self) -> bool:
        """Whether a key was ever created (then every request needs one: docs/keys.md)."""
        async with self.store.engine.connect() as conn:
            return await conn.scalar(select(schema.api_keys.c.id).limit(1)) is not None

    async def revoke(self, name: str) -> KeyRecord:
        """Revoke the key named ``name``; it stops working on every replica within seconds."""
        table = schema.api_keys
        async with self.store.engine.begin() as conn:
            result = await conn.execute(
                update(table)
                .where(table.c.name == name, table.c.revoked_at.is_(None))
                .values(revoked_at=now())
            )
            if result.rowcount == 0:
                raise KeyStoreError(f"no active key named {name!r}")
            await bump(conn)
            row = (await conn.execute(select(table).where(table.c.name == name))).one()
        return _record(row)

    async def rotate(self, name: str) -> tuple[KeyRecord, str]:
        """A new secret for ``name`` (same id, limits and usage); the old one stops working."""
        table = schema.api_keys
        async with self.store.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(table).where(table.c.name == name, table.c.revoked_at.is_(None))
                )
            ).first()
            if row is None:
                raise KeyStoreError(f"no active key named {name!r}")
            key = new_key(row.id)
            await conn.execute(
                update(table)
                .where(table.c.id == row.id)
                .values(secret_hash=hash_key(key), rotated_at=now())
            )
            await bump(conn)
            row = (await conn.execute(select(table).where(table.c.id == row.id))).one()
        return _record(row), key
