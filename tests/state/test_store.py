"""The state store on SQLite and on the real PostgreSQL: migrations, keys, the change counter,
verification and its cache, usage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from embedplex.config import Settings
from embedplex.core.tenant import KeyLimits, Priority
from embedplex.state.cache import KeyRejectedError, KeyStoreUnavailableError, KeyVerifier
from embedplex.state.keys import KeySpec, KeyStore, KeyStoreError, duration, split_key
from embedplex.state.store import StateStore
from embedplex.state.url import resolve
from embedplex.state.usage import UsageMeter, usage_since
from helpers import free_port
from state_fixtures import _pg as state_fixtures_pg
from state_fixtures import pg_url, state_url  # noqa: F401  (fixtures)


@pytest.fixture
async def store(state_url: str) -> AsyncIterator[StateStore]:  # noqa: F811
    async with StateStore.from_url(state_url) as s:
        yield s


async def test_migrations_apply_once_and_again(state_url: str) -> None:  # noqa: F811
    first, second = StateStore.from_url(state_url), StateStore.from_url(state_url)
    # Two replicas starting at once: the advisory lock (PostgreSQL) or the file lock serializes.
    await asyncio.gather(first.upgrade(), second.upgrade())
    await first.upgrade()
    assert await first.version() == 0
    await first.close()
    await second.close()


async def test_create_list_and_the_key_is_never_stored(store: StateStore) -> None:
    keys = KeyStore(store)
    spec = KeySpec(
        name="search-frontend",
        models=("minilm", "rerank-*"),
        rpm=600,
        tpm=200_000,
        max_concurrent=16,
        priority=Priority.BATCH,
        weight=3,
        expires_in=duration("90d"),
    )
    record, key = await keys.create(spec)
    parts = split_key(key)
    assert parts is not None and parts[0] == record.id
    assert await store.version() == 1
    listed = await keys.list()
    assert [r.name for r in listed] == ["search-frontend"]
    public = listed[0].public()
    assert key not in str(public) and parts[1] not in listed[0].secret_hash
    assert "secret_hash" not in public
    assert listed[0].secret_hash.startswith("$argon2id$")
    tenant = listed[0].tenant()
    assert tenant.key_id == record.id and tenant.priority is Priority.BATCH
    assert tenant.limits == KeyLimits(rpm=600, tpm=200_000, max_concurrent=16)
    assert tenant.weight == 3 and tenant.allows("rerank-x") and not tenant.allows("other")
    assert listed[0].expires_at is not None
    assert listed[0].expires_at - datetime.now(UTC) > timedelta(days=89)
    with pytest.raises(KeyStoreError, match="exists"):
        await keys.create(KeySpec(name="search-frontend"))
    with pytest.raises(KeyStoreError, match="names"):
        await keys.create(KeySpec(name="has space"))


async def test_verify_cache_rotate_revoke_expire(store: StateStore) -> None:
    keys = KeyStore(store)
    verifier = KeyVerifier(keys, poll_s=0.05)
    await verifier.start()
    try:
        assert not verifier.required
        record, key = await keys.create(KeySpec(name="k"))
        await verifier.refresh()
        assert verifier.required
        assert verifier.cached(key.encode()) is None
        assert (await verifier.verify(key.encode())).key_id == record.id
        assert verifier.cached(key.encode()) is not None  # no hash the second time
        with pytest.raises(KeyRejectedError):
            await verifier.verify(key[:-2].encode() + b"xx")
        with pytest.raises(KeyRejectedError):
            await verifier.verify(b"ep_000000000000_" + b"a" * 43)  # unknown id
        _, new = await keys.rotate("k")
        # The poller notices the change counter and forgets the old key.
        for _ in range(100):
            if verifier.cached(key.encode()) is None:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(KeyRejectedError, match="invalid"):
            await verifier.verify(key.encode())
        assert (await verifier.verify(new.encode())).key_id == record.id
        await keys.revoke("k")
        await verifier.refresh()
        # Refused as an unknown key is: without a hash nothing shows the caller holds it.
        with pytest.raises(KeyRejectedError, match=r"^invalid API key$"):
            await verifier.verify(new.encode())
        with pytest.raises(KeyStoreError):
            await keys.revoke("k")
        _, short = await keys.create(KeySpec(name="short", expires_in=timedelta(seconds=1)))
        await verifier.refresh()
        assert (await verifier.verify(short.encode())).key_id is not None
        await asyncio.sleep(1.1)
        # This process verified it: it may say why it stopped.
        with pytest.raises(KeyRejectedError, match="expired"):
            verifier.cached(short.encode())
        with pytest.raises(KeyRejectedError, match="expired"):
            await verifier.verify(short.encode())
        await keys.create(KeySpec(name="later"))
        await verifier.refresh()  # a change that leaves its row alone: still verified here
        with pytest.raises(KeyRejectedError, match="expired"):
            await verifier.verify(short.encode())
        fresh = KeyVerifier(keys)  # a process that never verified it: no word on why
        await fresh.refresh()
        with pytest.raises(KeyRejectedError, match=r"^invalid API key$"):
            await fresh.verify(short.encode())
    finally:
        await verifier.close()


async def test_usage_is_batched_and_summed(store: StateStore) -> None:
    keys = KeyStore(store)
    record, _ = await keys.create(KeySpec(name="u"))
    meter = UsageMeter(store, flush_s=3600)
    for _ in range(5):
        meter.add(record.id, 2, 10, refused=False)
    meter.add(record.id, 0, 0, refused=True)
    meter.add("static", 1, 4, refused=False)
    assert await usage_since(store, None) == []  # nothing written before a flush
    await meter.flush()
    meter.add(record.id, 1, 1, refused=False)
    await meter.close()  # flushes the rest
    totals = {t.key_id: t for t in await usage_since(store, None)}
    mine = totals[record.id]
    assert (mine.name, mine.requests, mine.inputs, mine.tokens, mine.refusals) == (
        "u",
        7,
        11,
        51,
        1,
    )
    assert totals["static"].name is None and totals["static"].tokens == 4
    later = datetime.now(UTC) + timedelta(minutes=2)
    assert await usage_since(store, later) == []


def test_urls() -> None:
    assert resolve("postgresql://u:pw@h/db?schema=s1").url.drivername == "postgresql+asyncpg"
    target = resolve("postgresql://u:pw@h/db?schema=s1")
    assert target.schema == "s1" and "pw" not in target.display()
    assert "schema" not in target.url.query
    with pytest.raises(ValueError, match="state_url"):
        resolve("mysql://h/db")


async def test_an_unreachable_store_is_unavailable_not_a_wrong_key(tmp_path: Path) -> None:
    dead = StateStore.from_url(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    verifier = KeyVerifier(KeyStore(dead))
    with pytest.raises(KeyStoreUnavailableError):
        await verifier.verify(b"ep_0123456789ab_" + b"s" * 43)
    await dead.close()


def test_config_show_hides_the_store_password() -> None:
    settings = Settings(state_url="postgresql://embedplex:hunter2@db:5432/embedplex")
    shown = settings.redacted()["state_url"]
    assert "hunter2" not in shown and shown == "postgresql://embedplex:***@db:5432/embedplex"
    assert Settings(state_url="sqlite:///x.db").redacted()["state_url"] == "sqlite:///x.db"


async def test_stored_providers_survive_a_rolling_upgrade(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas of two versions share the store: only set fields are written, and a field a
    newer version wrote is dropped (with a warning) rather than failing every stored provider."""
    from sqlalchemy import update

    from embedplex.providers.config import ProviderConfig
    from embedplex.state import schema
    from embedplex.state.providers import ProviderStore

    providers = ProviderStore(store)
    plain = ProviderConfig(name="a", type="openai", endpoint="http://127.0.0.1:9")
    tuned = ProviderConfig(name="b", type="tei", endpoint="http://127.0.0.1:9", max_quiet_ms=0)
    await providers.put(plain, None)
    await providers.put(tuned, "served-b")
    async with store.engine.connect() as conn:
        rows = {r.name: r.config for r in await conn.execute(schema.providers.select())}
    assert rows["a"] == {"name": "a", "type": "openai", "endpoint": "http://127.0.0.1:9"}
    assert rows["b"]["max_quiet_ms"] == 0
    assert await providers.all() == {"a": (plain, None), "b": (tuned, "served-b")}
    newer = {**rows["a"], "max_jitter_ms": 5}  # a field of some later version
    async with store.engine.begin() as conn:
        await conn.execute(
            update(schema.providers).where(schema.providers.c.name == "a").values(config=newer)
        )
    assert (await providers.all())["a"] == (plain, None)
    assert "max_jitter_ms" in caplog.text


async def test_a_failed_statement_does_not_carry_its_parameters(pg_url: str) -> None:  # noqa: F811
    """A key's hash is a parameter of its INSERT: the error (logged with its traceback) must
    not show it. Past the API's bounds, a limit too large for INTEGER fails the INSERT."""
    async with StateStore.from_url(pg_url) as store:
        with pytest.raises(DBAPIError) as failed:
            await KeyStore(store).create(KeySpec(name="big", rpm=3_000_000_000))
    text = str(failed.value)
    assert "$argon2" not in text and "parameters hidden" in text


async def test_a_flush_of_more_rows_than_one_statement_can_bind_is_written(
    store: StateStore,
) -> None:
    """6 parameters a row, asyncpg's 32,767 a statement: 5,500 keys in one flush used to fail,
    and every later flush with them, for good."""
    meter = UsageMeter(store, flush_s=3600)
    count = 5_500
    for i in range(count):
        meter.add(f"k{i:05d}", 2, 3, refused=False)
    await meter.flush()
    assert meter._counts == {}  # nothing left over for the next flush
    totals = await usage_since(store, None)
    assert len(totals) == count
    assert sum(t.requests for t in totals) == count and sum(t.tokens for t in totals) == 3 * count


async def test_a_schema_with_capitals_is_created_and_used(pg_url: str) -> None:  # noqa: F811
    """CREATE SCHEMA quoted the name and search_path did not: PostgreSQL folded the latter to
    lower case, so a ?schema= with capitals never found its own tables."""
    url = pg_url.replace("?schema=t_", "?schema=T_Caps_")
    schema_name = url.rsplit("=", 1)[1]
    try:
        async with StateStore.from_url(url) as s:
            record, _ = await KeyStore(s).create(KeySpec(name="caps"))
            assert [r.name for r in await KeyStore(s).list()] == ["caps"]
            assert record.id
    finally:
        await state_fixtures_pg(f'DROP SCHEMA IF EXISTS "{schema_name}" CASCADE')


def test_a_schema_name_that_is_not_an_identifier_is_refused() -> None:
    with pytest.raises(ValueError, match="letters, digits and _ only"):
        resolve("postgresql://h/db?schema=a;drop")
