"""What refusing a key costs (``state/cache.py``): hostile callers choose refusals, so a revoked
row is refused without a hash, a refused key is remembered briefly (bounded, forgotten on a
change), concurrent requests of one key share a hash, and the queue for the hashing slots is
bounded. Hashes are counted by wrapping ``verify_hash`` where the verifier calls it."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from embedplex.state import cache, schema
from embedplex.state import keys as keys_module
from embedplex.state.cache import KeyRejectedError, KeyVerifier, KeyVerifierBusyError
from embedplex.state.keys import KeySpec, KeyStore, verify_hash
from embedplex.state.store import bump, now


def wrong(key: str, n: int = 0) -> bytes:
    """The key with another secret: same (real) id, so its row is read and hashed."""
    return (key[:-6] + f"Wrong{n}")[: len(key)].encode()


async def test_revoked_and_expired_rows_are_refused_before_any_hash(
    keys: KeyStore, hashes: list[str]
) -> None:
    verifier = KeyVerifier(keys)
    _, revoked = await keys.create(KeySpec(name="revoked"))
    await keys.revoke("revoked")
    expired_record, expired = await keys.create(KeySpec(name="expired"))
    async with keys.store.engine.begin() as conn:
        await conn.execute(
            update(schema.api_keys)
            .where(schema.api_keys.c.id == expired_record.id)
            .values(expires_at=now() - timedelta(seconds=1))
        )
        await bump(conn)
    await verifier.refresh()
    for presented in (revoked.encode(), wrong(revoked), expired.encode()):
        # The words of an unknown id: nothing shows that this id was ever a key.
        with pytest.raises(KeyRejectedError) as info:
            await verifier.verify(presented)
        assert info.value.reason == "invalid API key"
    assert hashes == []


async def test_a_refused_key_is_hashed_once_until_its_time_is_up(
    keys: KeyStore, hashes: list[str]
) -> None:
    verifier = KeyVerifier(keys)
    _, key = await keys.create(KeySpec(name="k"))
    await verifier.refresh()
    for _ in range(5):
        with pytest.raises(KeyRejectedError, match=r"^invalid API key$"):
            await verifier.verify(wrong(key))
    # The pipeline's synchronous look first: refused without an await.
    with pytest.raises(KeyRejectedError, match=r"^invalid API key$"):
        verifier.cached(wrong(key))
    assert hashes == [wrong(key).decode()]
    # Concurrent requests of one key share its verification.
    outcomes = await asyncio.gather(
        *(verifier.verify(wrong(key, 1)) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(o, KeyRejectedError) for o in outcomes)
    assert len(hashes) == 2
    # The right key is untouched by the refusals of its id.
    assert (await verifier.verify(key.encode())).key_id == key.split("_")[1]
    assert len(hashes) == 3

    brief = KeyVerifier(keys, refused_ttl_s=0.2)
    await brief.refresh()
    with pytest.raises(KeyRejectedError):
        await brief.verify(wrong(key))
    await asyncio.sleep(0.25)
    with pytest.raises(KeyRejectedError):
        await brief.verify(wrong(key))
    assert len(hashes) == 5  # remembered for a while, not for ever


async def test_refused_keys_held_are_bounded(keys: KeyStore, hashes: list[str]) -> None:
    verifier = KeyVerifier(keys, refused_max=3)
    _, key = await keys.create(KeySpec(name="k"))
    await verifier.refresh()

    async def refuse(presented: bytes) -> None:
        with pytest.raises(KeyRejectedError):
            await verifier.verify(presented)

    for n in range(4):
        await refuse(wrong(key, n))
    assert len(hashes) == 4
    await refuse(wrong(key, 3))  # the newest: remembered
    assert len(hashes) == 4
    await refuse(wrong(key, 0))  # the oldest: pushed out, hashed again
    assert len(hashes) == 5
    # Random keys (unknown ids: no hash) cannot grow it either.
    for n in range(500):
        await refuse(f"ep_{n:012x}_{'s' * 43}".encode())
    assert len(verifier._refused) == 3


async def test_a_change_forgets_refused_keys_at_once(
    keys: KeyStore, hashes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = KeyVerifier(keys)
    _, key = await keys.create(KeySpec(name="k"))
    await verifier.refresh()
    chosen = wrong(key)
    for _ in range(2):
        with pytest.raises(KeyRejectedError):
            await verifier.verify(chosen)
    assert len(hashes) == 1  # remembered
    # A rotation makes exactly that key valid (the secret is fixed here to make it so).
    monkeypatch.setattr(keys_module, "new_key", lambda key_id: chosen.decode())
    _, rotated = await keys.rotate("k")
    assert rotated.encode() == chosen
    await verifier.refresh()  # what the admin API does after a change (the poller elsewhere)
    assert verifier.cached(chosen) is None
    assert (await verifier.verify(chosen)).key_id == key.split("_")[1]


def hold_hashes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make every hash wait for the returned gate (set it, in a ``finally``)."""
    gate = threading.Event()

    def held(stored: str, presented: str) -> bool:
        gate.wait(10)
        return verify_hash(stored, presented)

    monkeypatch.setattr(cache, "verify_hash", held)
    return gate


async def queued(verifier: KeyVerifier, n: int) -> None:
    for _ in range(200):
        if verifier._waiting == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{verifier._waiting} verifications queued, not {n}")


async def test_past_the_hash_queue_a_new_key_is_refused_at_once(
    keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = KeyVerifier(keys, hashes_at_once=1, hash_waiters=2)
    _, key = await keys.create(KeySpec(name="k"))
    _, known = await keys.create(KeySpec(name="known"))
    await verifier.refresh()
    assert (await verifier.verify(known.encode())).key_id  # verified before the flood
    gate = hold_hashes(monkeypatch)
    flood = [asyncio.create_task(verifier.verify(wrong(key, n))) for n in range(3)]
    try:
        await queued(verifier, 2)  # one hashing (held), two queued: the queue is full
        for presented in (wrong(key, 9), key.encode()):
            with pytest.raises(KeyVerifierBusyError):
                await asyncio.wait_for(verifier.verify(presented), 1)
        assert verifier.cached(known.encode()) is not None  # a verified key is never refused
    finally:
        gate.set()
    outcomes = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(o, KeyRejectedError) for o in outcomes)
    assert (await verifier.verify(key.encode())).key_id  # a slot again


async def test_one_key_id_cannot_take_the_whole_queue(
    keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = KeyVerifier(keys, hashes_at_once=1, hash_waiters=8, id_waiters=1)
    _, theirs = await keys.create(KeySpec(name="theirs"))
    _, mine = await keys.create(KeySpec(name="mine"))
    await verifier.refresh()
    gate = hold_hashes(monkeypatch)
    flood = [asyncio.create_task(verifier.verify(wrong(theirs, n))) for n in range(2)]
    try:
        await queued(verifier, 1)  # one of their id hashing, one queued: their share
        with pytest.raises(KeyVerifierBusyError):
            await asyncio.wait_for(verifier.verify(wrong(theirs, 9)), 1)
        first = asyncio.create_task(verifier.verify(mine.encode()))
        await queued(verifier, 2)  # another id still finds a place
    finally:
        gate.set()
    assert (await first).key_id == mine.split("_")[1]
    outcomes = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(o, KeyRejectedError) for o in outcomes)


async def test_keys_verified_before_a_change_are_never_refused_for_a_full_queue(
    keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change whose rows cannot be read empties the cache: every active client's next
    request needs a hash at once, and past the queue's bound 40 clients got 429 (review). Keys
    verified before wait their turn instead; a new key past the bound is still refused at
    once."""
    verifier = KeyVerifier(keys, hash_waiters=4, id_waiters=4)
    known = [(await keys.create(KeySpec(name=f"k{i}")))[1].encode() for i in range(12)]
    await verifier.refresh()
    for key in known:
        await verifier.verify(key)
    await keys.create(KeySpec(name="new"))  # a change ...

    async def fails(_ids: object) -> None:
        raise OSError("the store went away")

    with monkeypatch.context() as patch:  # ... whose rows cannot be read: the cache is emptied
        patch.setattr(keys, "get_many", fails)
        with pytest.raises(OSError, match="went away"):
            await verifier.refresh()
    await verifier.refresh()
    assert all(verifier.cached(key) is None for key in known)
    newcomers = [(await keys.create(KeySpec(name=f"n{i}")))[1].encode() for i in range(8)]
    await verifier.refresh()
    out = await asyncio.gather(
        *(verifier.verify(key) for key in known + newcomers), return_exceptions=True
    )
    assert not any(isinstance(o, BaseException) for o in out[: len(known)]), out
    assert any(isinstance(o, KeyVerifierBusyError) for o in out[len(known) :]), out


async def test_a_request_after_a_change_never_joins_a_verification_from_before_it(
    keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verification that read the row before a revocation answers its own callers; one that
    starts after the change reads the revoked row (review: it joined the old flight)."""
    verifier = KeyVerifier(keys)
    _, key = await keys.create(KeySpec(name="k"))
    await verifier.refresh()
    release = threading.Event()

    def slow(stored: str, presented: str) -> bool:
        release.wait(10)
        return verify_hash(stored, presented)

    monkeypatch.setattr(cache, "verify_hash", slow)
    before = asyncio.ensure_future(verifier.verify(key.encode()))
    await asyncio.sleep(0.1)  # reading the row, then hashing
    await keys.revoke("k")
    await verifier.refresh()
    after = asyncio.ensure_future(verifier.verify(key.encode()))
    await asyncio.sleep(0.05)
    release.set()
    await before  # read before the revocation: its own answer
    with pytest.raises(KeyRejectedError):
        await after
