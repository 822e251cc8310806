"""A key's ``tpm`` and a Ray-served model (``models/ray_spend.py``): its calls reserve before
they are made, as a local model's inputs do before they queue, and a call whose caller left is
charged its estimate. First the gateway's side with a fake handle and the real ``_Release``
over the in-process store; then through the app, with the real replica behind a handle that
pickles and runs it in a context of its own, as Ray does."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pickle
import typing
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_ray_model import (
    ERRORS,
    INFO,
    Broken,
    FakeHandle,
    Full,
    Method,
    StuckMethod,
    fail,
    ok,
    ray_config,
)
from test_ray_routes import ERRORS as NO_RAY_ERRORS
from test_ray_routes import PickleHandle, _settings

from embedplex.api.app import create_app
from embedplex.api.pipeline import Exchange, Pipeline
from embedplex.api.ratelimit import _Release
from embedplex.config import Settings
from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
from embedplex.core.errors import (
    InvalidRequestError,
    KeyRateLimitedError,
    OverloadedError,
    UnavailableError,
    UpstreamTimeoutError,
)
from embedplex.core.spend import REQUEST_SPEND
from embedplex.core.tenant import KeyLimits, Tenant
from embedplex.core.types import EmbedRequest, RerankRequest, Timings
from embedplex.gateway import Gateway
from embedplex.limits import LocalLimits, RateLimiter
from embedplex.models.ray import RayModel
from embedplex.ray.application import REPLICA_SETTINGS
from embedplex.ray.replica import EmbedplexReplica
from embedplex.ray.wire import RerankAnswer, TokenEmbedAnswer
from helpers import eventually, running
from tenants import TenantByHeader
from tiny_models import make_tiny_bert

# The gateway knows the prompts and the input length from the replicas' ModelInfo.
PROMPTED = dataclasses.replace(INFO, prompts={"q": "query: "}, max_input_length=128)


class Key:
    """A key with ``tpm`` as the ``RateLimit`` stage admits it: the real ``RateLimiter`` and
    ``_Release`` over the in-process store, on a frozen clock (no refill)."""

    def __init__(self, tpm: int) -> None:
        self.limiter = RateLimiter()
        self.limiter.local = LocalLimits(lambda: 1000.0)
        self.limits = KeyLimits(tpm=tpm)

    async def admit(self) -> _Release:
        _, lease = await self.limiter.admit("k", self.limits)
        assert lease is not None
        return _Release(self.limiter, lease, [])

    def remaining(self) -> int:
        budget = self.limiter.local.admit("k", self.limits).tokens
        assert budget is not None
        return budget.remaining

    def finish(self, release: _Release, status: int, tokens: int = 0) -> None:
        """The stage's finish: ``tokens`` the route recorded (an answer's)."""
        release(
            typing.cast(Exchange, SimpleNamespace(record=SimpleNamespace(tokens=tokens))), status
        )


@contextlib.contextmanager
def spending(release: _Release) -> Iterator[None]:
    """As the stage does for a request of a key with ``tpm``."""
    token = REQUEST_SPEND.set(release)
    try:
        yield
    finally:
        REQUEST_SPEND.reset(token)


def ray_model(handle: Any) -> RayModel:
    return RayModel(ray_config(), handle, PROMPTED, errors=ERRORS)


# What a replica answers, by method (3 tokens counted).
ANSWERS: dict[str, Callable[[], Any]] = {
    "embed": ok("r"),
    "embed_all": lambda: TokenEmbedAnswer.pack([np.ones((1, 4), np.float32)], 3, Timings(), "r"),
    "rerank": lambda: RerankAnswer([0.5], 3, Timings(), "r"),
}

# Each text reserves one token a character plus 2 (its prompt's characters included), at most
# the model's input length; an estimate of a quarter of that is charged if its caller leaves.
CALLS: list[tuple[str, object, int, int]] = [
    # 7 + 11 characters, and 7 + 200 (capped at 128)
    ("embed", EmbedRequest(inputs=["hello world", "a" * 200], prompt_name="q"), 20 + 128, 6 + 53),
    ("embed_all", EmbedRequest(inputs=["hello world"], prompt="p: "), 16, 5),
    ("embed_all", EmbedRequest(inputs=[[5] * 200, [5, 6]]), 130, 130),  # ids, as given (capped)
    ("rerank", RerankRequest(query="what", texts=["a fox", "b" * 300]), 12 + 128, 4 + 78),
]


@pytest.mark.parametrize(("method", "request_", "bound", "cost"), CALLS)
async def test_a_ray_call_reserves_its_bound_before_it_is_made_and_is_charged_the_answer(
    method: str, request_: Any, bound: int, cost: int
) -> None:
    """They used to reserve nothing (charged at the finish only), so a burst of them all
    passed."""
    key = Key(tpm=100_000)
    seen: list[int] = []

    def answer() -> Any:
        seen.append(key.remaining())  # what the key had left while the replica worked
        return ANSWERS[method]()

    stuck = StuckMethod()
    m = ray_model(FakeHandle(**{method: Method([answer])}))
    left = ray_model(FakeHandle(**{method: stuck}))
    release = await key.admit()
    with spending(release):
        await getattr(m, method)(request_)
    assert seen == [100_000 - bound]
    key.finish(release, 200, tokens=3)  # the replica's count, as the route recorded it
    assert key.remaining() == 100_000 - 3
    # A caller that leaves once the call was sent is charged the estimate.
    release = await key.admit()
    with spending(release):
        task = asyncio.ensure_future(getattr(left, method)(request_))
    await asyncio.wait_for(stuck.called.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    key.finish(release, 499)
    assert key.remaining() == 100_000 - 3 - cost
    assert stuck.responses[0].cancelled  # and the Ray call with it


async def test_a_refused_reservation_is_the_keys_429_and_makes_no_call() -> None:
    key = Key(tpm=1000)
    release = await key.admit()
    key.limiter.local.charge("k", key.limits, 1000)  # a parallel request reserved it all
    method = Method([ok("r")])
    m = ray_model(FakeHandle(method))
    with spending(release), pytest.raises(KeyRateLimitedError, match="tokens per minute"):
        await m.embed(EmbedRequest(inputs=["hello"]))
    assert method.calls == 0 and m.stats()["active_requests"] == 0


def _ends(*answers: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    return lambda: ray_model(FakeHandle(Method(list(answers)))).embed(REQUEST)


REQUEST = EmbedRequest(inputs=["the quick brown fox jumps over"])  # 30 characters
BOUND, COST = 32, 9


@pytest.mark.parametrize(
    ("ends", "error"),
    [
        (_ends(fail(Broken())), UnavailableError),  # a Ray error
        (_ends(fail(Full())), OverloadedError),  # Serve's queue was full
        (_ends(lambda: InvalidRequestError("too long")), InvalidRequestError),  # the replica's
    ],
)
async def test_a_failed_ray_call_costs_nothing_and_gives_its_hold_back(
    ends: Callable[[], Awaitable[Any]], error: type[Exception]
) -> None:
    """As a local model's failed batch: no work the key pays for; a retry of the same inputs
    within the request (a failover) reserves nothing more than the first did."""
    key = Key(tpm=100_000)
    release = await key.admit()
    with spending(release):
        with pytest.raises(error):
            await ends()
        assert key.remaining() == 100_000 - BOUND
        assert release.tokens() == 0
        with pytest.raises(error):  # again: the first's hold was given back, not added to
            await ends()
        assert key.remaining() == 100_000 - BOUND
    key.finish(release, 503)
    assert key.remaining() == 100_000


async def test_past_the_deadline_a_sent_call_is_charged_and_a_stuck_replica_is_not() -> None:
    """The request's deadline (504) is the caller's choice, made after the replica may have
    run the call: charged as a client that left. A replica that never answered within the
    model's own bound (503) did no work: nothing."""
    key = Key(tpm=100_000)
    release = await key.admit()
    deadline = REQUEST_DEADLINE.set(Deadline.after(0.1, "X-Request-Timeout"))
    try:
        with spending(release), pytest.raises(UpstreamTimeoutError):
            await ray_model(FakeHandle(StuckMethod())).embed(REQUEST)
    finally:
        REQUEST_DEADLINE.reset(deadline)
    key.finish(release, 504)
    assert key.remaining() == 100_000 - COST
    release = await key.admit()
    stuck = ray_model(FakeHandle(StuckMethod()))
    stuck.bound_s = 0.1
    with spending(release), pytest.raises(UnavailableError, match="no answer"):
        await stuck.embed(REQUEST)
    key.finish(release, 503)
    assert key.remaining() == 100_000 - COST


# Through the app: a real replica (the tiny model's) behind ``PickleHandle``.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("ray-spend") / "tiny")


def limited_ray_app(
    tiny: Path, cache: Path, tpm: int, before: Callable[[], Awaitable[None]]
) -> Any:
    """The app serving ``ray`` through a replica whose calls run ``before`` first, and key
    ``k`` with ``tpm`` (picked by ``x-test-tenant``, where authentication is)."""
    settings = _settings(tiny, cache, ray={})
    (table,) = settings.local_models()
    shipped = settings.model_dump(mode="json", include=set(REPLICA_SETTINGS))

    def gateway(s: Settings) -> Gateway:
        replica = EmbedplexReplica(shipped, table.model_dump(mode="json"))
        info = pickle.loads(pickle.dumps(replica._model.info))
        handle = PickleHandle(replica, before)
        return Gateway([RayModel(table, handle, info, errors=NO_RAY_ERRORS)])

    app = create_app(settings, gateway_factory=gateway)
    pipeline = app.edge
    assert isinstance(pipeline, Pipeline)
    tenant = Tenant(key_id="k", limits=KeyLimits(tpm=tpm))
    pipeline.stages.insert(2, TenantByHeader({"k": tenant}))
    return app


KEY = {"x-test-tenant": "k"}


def long_texts(tag: str, n: int) -> list[str]:
    """``n`` distinct texts longer than the model's 32 tokens: each counts 32 (truncated)."""
    return [
        f"{tag} text {i}: " + "the quick brown fox jumps over a lazy dog " * 6 for i in range(n)
    ]


async def test_a_burst_to_a_ray_model_is_held_to_tokens_per_minute(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A ``tpm = 1000`` key sends 6 requests of 40 texts at once (1,280 tokens each): the first
    to reserve overspends what was left, the other five get the key's 429 without a call to a
    replica. They used to get six 200s (the Ray call reserved nothing)."""
    calls: list[int] = []

    async def slow() -> None:  # every request is admitted before any finishes
        calls.append(1)
        await asyncio.sleep(0.3)

    app = limited_ray_app(tiny, tmp_path_factory.getbasetemp() / "ray-spend-export", 1000, slow)
    async with running(app) as client:
        answers = await asyncio.gather(
            *(
                client.post("/v1/embeddings", json={"input": long_texts(f"r{r}", 40)}, headers=KEY)
                for r in range(6)
            )
        )
    assert sorted(a.status_code for a in answers) == [200] + [429] * 5
    (answered,) = [a for a in answers if a.status_code == 200]
    assert answered.json()["usage"]["prompt_tokens"] == 40 * 32  # the replica's count
    for refused in (a for a in answers if a.status_code == 429):
        assert "tokens per minute" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert len(calls) == 1


async def test_a_client_that_leaves_mid_call_is_charged_its_estimate(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The call reached the replica: its texts are charged the estimate (characters / 4 + 2,
    at most 32 each) when the client leaves (they used to cost nothing); while it ran, their
    bound was held. An answer is then charged what the replica counted."""
    sent = asyncio.Event()
    hold = asyncio.Event()

    async def held() -> None:
        sent.set()
        await hold.wait()

    app = limited_ray_app(tiny, tmp_path_factory.getbasetemp() / "ray-spend-export", 100_000, held)
    limiter: RateLimiter = app.state.rate_limiter
    limiter.local = LocalLimits(lambda: 5000.0)  # frozen: no refill
    texts = ["one two three", "four five six seven eight nine ten " * 2]
    estimate = sum(min(32, len(t) // 4 + 2) for t in texts)
    bound = sum(min(32, len(t) + 2) for t in texts)
    async with running(app) as client:

        async def remaining() -> int:
            answer = await client.get("/v1/models", headers=KEY)
            return int(answer.headers["x-ratelimit-remaining-tokens"])

        task = asyncio.create_task(
            client.post("/v1/embeddings", json={"input": texts}, headers=KEY)
        )
        await asyncio.wait_for(sent.wait(), 10)
        assert await remaining() == 100_000 - bound
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await eventually(lambda: limiter.local.in_flight("k") == 0)
        assert await remaining() == 100_000 - estimate
        hold.set()
        answer = await client.post("/v1/embeddings", json={"input": texts}, headers=KEY)
        assert answer.status_code == 200
        used = answer.json()["usage"]["prompt_tokens"]
        assert await remaining() == 100_000 - estimate - used
