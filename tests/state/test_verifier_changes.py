"""What a change in the store does to the keys a process has verified (``state/cache.py``).

A change (a key created, revoked, rotated; a provider stored) used to empty the cache: every
active key was hashed again on every replica, and a store that went away before a key's next
request left it 503 for the whole outage. The poll now checks the cached keys against their
rows: revoked, rotated and deleted keys go, changed limits are taken, the rest stay verified
without a hash. A read of the rows that fails forgets every key (the change may be a
revocation). The change's listeners (the stored providers' sync) run in a task of their own: a
listener that waits on an upstream no longer holds up the next poll, nor so a revocation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import delete, update

from embedplex.core.tenant import KeyLimits
from embedplex.state import schema
from embedplex.state.cache import KeyRejectedError, KeyVerifier
from embedplex.state.keys import KeySpec, KeyStore
from embedplex.state.store import bump


async def until(check: Callable[[], bool], seconds: float) -> None:
    """Wait until ``check()`` holds; TimeoutError past ``seconds``."""
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 (the verifier's state: no event to wait on)
            await asyncio.sleep(0.01)


async def test_a_change_checks_cached_keys_against_their_rows_without_a_hash(
    keys: KeyStore, hashes: list[str]
) -> None:
    verifier = KeyVerifier(keys)
    made = {name: await keys.create(KeySpec(name=name, rpm=10)) for name in "abcde"}
    await verifier.refresh()
    for _, key in made.values():
        await verifier.verify(key.encode())
    assert len(hashes) == 5

    await keys.create(KeySpec(name="unrelated"))
    await verifier.refresh()
    for _, key in made.values():  # still verified: no hash, no store read
        assert verifier.cached(key.encode()) is not None
    assert len(hashes) == 5

    await keys.revoke("a")
    _, rotated = await keys.rotate("b")
    table = schema.api_keys
    async with keys.store.engine.begin() as conn:
        await conn.execute(update(table).where(table.c.name == "c").values(rpm=99, tpm=500))
        await conn.execute(delete(table).where(table.c.name == "d"))
        await bump(conn)
    await verifier.refresh()
    for name in "abd":  # revoked, rotated (the old secret), deleted: gone
        assert verifier.cached(made[name][1].encode()) is None
        with pytest.raises(KeyRejectedError, match=r"^invalid API key$"):
            await verifier.verify(made[name][1].encode())
    changed = verifier.cached(made["c"][1].encode())
    assert changed is not None and changed.limits == KeyLimits(rpm=99, tpm=500)
    assert verifier.cached(made["e"][1].encode()) is not None
    # Only the rotated key's old secret was hashed (an active row); the others never were.
    assert hashes[5:] == [made["b"][1]]
    assert (await verifier.verify(rotated.encode())).key_id == made["b"][0].id


async def test_a_key_that_expired_stays_known_as_expired_across_a_change(keys: KeyStore) -> None:
    verifier = KeyVerifier(keys)
    # 3 s: the first verify (a row read and an argon2 hash) must land before it expires, on a
    # loaded machine too.
    _, short = await keys.create(KeySpec(name="short", expires_in=timedelta(seconds=3)))
    await verifier.refresh()
    await verifier.verify(short.encode())
    await asyncio.sleep(3.1)
    await keys.create(KeySpec(name="later"))
    await verifier.refresh()
    with pytest.raises(KeyRejectedError, match="expired"):
        await verifier.verify(short.encode())


async def test_rows_that_cannot_be_read_after_a_change_forget_every_key(
    keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change seen may be a revocation: unchecked, no key stays verified; the next poll
    that reads the store applies the change."""
    verifier = KeyVerifier(keys)
    record, key = await keys.create(KeySpec(name="k"))
    await verifier.refresh()
    await verifier.verify(key.encode())
    await keys.revoke("k")

    async def fails(_ids: object) -> None:
        raise OSError("the store went away")

    with monkeypatch.context() as patch:
        patch.setattr(keys, "get_many", fails)
        with pytest.raises(OSError, match="went away"):
            await verifier.refresh()
    assert verifier.cached(key.encode()) is None
    await verifier.refresh()
    with pytest.raises(KeyRejectedError):
        await verifier.verify(key.encode())
    assert record.id not in {e.tenant.key_id for e in verifier._cache.values()}


async def test_the_rows_of_many_keys_are_read_in_chunks(
    keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("embedplex.state.keys.IDS_PER_READ", 3)
    made = [(await keys.create(KeySpec(name=f"k{i}")))[0] for i in range(7)]
    found = await keys.get_many([r.id for r in made] + ["000000000000"])
    assert sorted(found) == sorted(r.id for r in made)
    assert found[made[0].id].name == "k0"


async def test_a_listener_that_waits_does_not_hold_up_a_revocation(keys: KeyStore) -> None:
    """The stored providers' sync may wait on an upstream (a TEI /info read: up to 5 s per
    provider); the poller waited with it, and a revocation made meanwhile reached this
    process only after it (review: 4.6 s on a second gateway, documented at most 2 s)."""
    verifier = KeyVerifier(keys, poll_s=0.05)
    gate = asyncio.Event()
    told = 0

    async def slow_listener() -> None:
        nonlocal told
        told += 1
        await gate.wait()

    _, key = await keys.create(KeySpec(name="k"))
    await verifier.start()
    verifier.listeners.append(slow_listener)
    try:
        await keys.create(KeySpec(name="other"))  # a change: the listener is told, and waits
        await until(lambda: told == 1, 5)
        assert (await verifier.verify(key.encode())).key_id is not None
        await keys.revoke("k")
        await until(lambda: verifier.cached(key.encode()) is None, 1)  # the listener waits on
        assert told == 1
        gate.set()
        await keys.create(KeySpec(name="third"))  # told again once the first is done
        await until(lambda: told == 2, 5)
    finally:
        gate.set()
        await verifier.close()


async def test_a_listener_that_failed_is_told_again_at_the_next_poll(keys: KeyStore) -> None:
    verifier = KeyVerifier(keys, poll_s=0.05)
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("the store went away")

    await verifier.start()
    verifier.listeners.append(flaky)
    try:
        await keys.create(KeySpec(name="k"))
        await until(lambda: calls == 2, 5)
        await asyncio.sleep(0.3)
        assert calls == 2  # told again once, then done until the next change
    finally:
        await verifier.close()


async def test_refreshes_that_overlap_never_set_the_version_back(
    keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poller's refresh and an admin route's overlap: the one that read the older
    counter and finished last must not leave it in place (a verification that began under it,
    before a revocation, would be cached as current)."""
    verifier = KeyVerifier(keys)
    await verifier.refresh()
    counters = iter([5, 6])
    first_any = asyncio.Event()

    async def version() -> int:
        return next(counters)

    async def any_key() -> bool:
        if not first_any.is_set():
            first_any.set()
            await asyncio.sleep(0.2)  # the first refresh is slow after reading 5
        return False

    monkeypatch.setattr(keys.store, "version", version)
    monkeypatch.setattr(keys, "any", any_key)
    slow = asyncio.create_task(verifier.refresh(notify=False))
    await first_any.wait()
    await verifier.refresh(notify=False)  # reads 6 meanwhile
    await slow
    assert verifier.version == 6
