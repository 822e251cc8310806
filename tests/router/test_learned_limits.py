"""Limits learned at run time stay sane: a refusal naming a limit under 1, or counting tokens
far from the router's reckoning, teaches nothing of it; what is learned stays above a
sixteenth of what the provider was told, and lasts ten minutes, after which the told limits
(TEI's /info read again) hold until an upstream refuses again. An answer too large for
``max_response_bytes`` to a call of many texts is a call too large: split, not a failure.

Every upstream is the real HTTP fake, refusing once in the vendor's words where a test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response

from conftest import RouterFactory
from embedplex.core.types import EmbedRequest
from embedplex.providers import adapter
from embedplex.providers.base import budget_tokens
from embedplex.providers.router import Router
from helpers import eventually
from upstream_fakes import Call, FakeUpstream, provider, serving, vector_for


class OnceUpstream(FakeUpstream):
    """The fake, answering its next call with ``once`` (status, body) instead (an odd
    refusal: a canary, a replica misconfigured for a minute), and as usual after it."""

    def __init__(self) -> None:
        super().__init__()
        self.once: tuple[int, Any] | None = None

    async def _serve(self, request: Request, texts_key: str) -> tuple[Response | None, Call]:
        if self.once is None:
            return await super()._serve(request, texts_key)
        (status, body), self.once = self.once, None
        payload = orjson.loads(await request.body())
        call = Call(request.url.path, payload, list(payload[texts_key]))
        self.calls.append(call)
        return Response(orjson.dumps(body), status_code=status), call


@pytest.fixture
def once_upstream() -> Iterator[OnceUpstream]:
    with serving(OnceUpstream()) as fake:
        yield fake


def tei_refusal(most: int) -> tuple[int, Any]:
    return 422, {"error": f"batch size 8 > maximum allowed batch size {most}"}


def openai_refusal(sent: int, most: int) -> tuple[int, Any]:
    return 400, {"error": {"message": f"Requested {sent} tokens, max {most} tokens per request"}}


TEXTS = [f"text {i} " * 20 for i in range(8)]


async def burst(router: Router, texts: list[str]) -> None:
    """One caller per text, all at once; every one must get its own vector."""
    results = await asyncio.gather(*(router.embed(EmbedRequest(inputs=[t]), ["p"]) for t in texts))
    for result, text in zip(results, texts, strict=True):
        assert (result.vectors[0] == vector_for(text)).all()


async def refused_once(
    fake: OnceUpstream, make_router: RouterFactory, kind: str, once: tuple[int, Any], **kw: Any
) -> Router:
    """A router whose provider's first call (``TEXTS``, one burst) is refused with ``once``;
    every caller still answered."""
    router = await make_router(provider("p", fake, kind, max_wait_ms=200, max_quiet_ms=0, **kw))
    fake.once = once
    await burst(router, TEXTS)
    assert router.runtimes["p"].counters["size_refusals"] == 1
    return router


async def test_a_limit_under_one_teaches_nothing(
    once_upstream: OnceUpstream, make_router: RouterFactory
) -> None:
    """ "maximum allowed batch size 0" held TEI to 1 text a call, "max 0 tokens per request"
    an OpenAI provider to 1 token (a text a call), until restart. A limit under 1 is no
    limit: the call is split in halves, and nothing is learned."""
    router = await refused_once(once_upstream, make_router, "tei", tei_refusal(0))
    assert router.runtimes["p"].stats()["max_texts_per_call"] == 64  # what /info says
    openai = await refused_once(
        once_upstream, make_router, "openai", openai_refusal(1000, 0), max_batch_tokens=100_000
    )
    assert openai.runtimes["p"].stats()["max_tokens_per_call"] == 100_000
    once_upstream.calls.clear()
    await burst(openai, [f"b{i}" for i in range(40)])
    assert [len(c.texts) for c in once_upstream.calls] == [40]


async def test_a_token_count_far_from_the_routers_reckoning_is_not_believed(
    once_upstream: OnceUpstream, make_router: RouterFactory
) -> None:
    """An upstream that counts the refused call at 100,000,000 tokens (a proxy's count, a
    cumulative one) is not scaling the router's reckoning by 300,000 / 100,000,000 (a budget
    of one token): it is no count at all, and half of what was sent is learned."""
    router = await refused_once(
        once_upstream, make_router, "openai", openai_refusal(100_000_000, 300_000)
    )
    assert router.runtimes["p"].stats()["max_tokens_per_call"] == (
        sum(map(budget_tokens, TEXTS)) // 2
    )


@pytest.mark.parametrize(
    ("kind", "once", "told", "field", "floor"),
    [
        ("tei", tei_refusal(1), {}, "max_texts_per_call", 64 // 16),
        (
            "openai",
            openai_refusal(2000, 1),
            {"max_batch_tokens": 100_000},
            "max_tokens_per_call",
            6250,
        ),
    ],
    ids=["texts", "tokens"],
)
async def test_what_is_learned_stays_above_a_sixteenth_of_what_was_told(
    once_upstream: OnceUpstream,
    make_router: RouterFactory,
    kind: str,
    once: tuple[int, Any],
    told: dict[str, Any],
    field: str,
    floor: int,
) -> None:
    """One refusal naming a tiny limit (1 text; 1 token of a call counted as the router
    reckons it) held the provider to it: now no lower than 1/16 of the limit it was told
    (TEI's /info 64: 4 texts; 100,000 tokens: 6,250)."""
    router = await refused_once(once_upstream, make_router, kind, once, **told)
    assert router.runtimes["p"].stats()[field] == floor


async def test_learned_limits_expire_and_the_told_ones_hold_again(
    once_upstream: OnceUpstream, make_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TEI whose /info says 64 refused one call at 8 (a replica, for a minute): its limit
    was 8 until restart, every later /info read held below it. Learned limits last
    LEARNED_TTL_S (here 0.3 s): then /info is read again and its 64 holds."""
    monkeypatch.setattr(adapter, "LEARNED_TTL_S", 0.3)
    texts = [f"text {i}" for i in range(16)]
    router = await make_router(provider("p", once_upstream, "tei", max_wait_ms=200, max_quiet_ms=0))
    once_upstream.once = 422, {"error": "batch size 16 > maximum allowed batch size 8"}
    await burst(router, texts)
    rt = router.runtimes["p"]
    assert rt.stats()["max_texts_per_call"] == 8
    await eventually(lambda: len(once_upstream.info_paths) == 2)  # at start, after the refusal
    assert rt.stats()["max_texts_per_call"] == 8  # /info's 64 held below the refusal's 8
    await asyncio.sleep(0.4)
    await burst(router, ["one"])  # its call ends on the limits as they are now
    assert rt.stats()["max_texts_per_call"] == 64
    assert rt.stats()["aimd"]["ceiling"] == 64
    once_upstream.calls.clear()
    await burst(router, [f"b{i}" for i in range(40)])
    assert [len(c.texts) for c in once_upstream.calls] == [40]
    assert len(once_upstream.info_paths) == 3  # read again when they expired


async def test_an_answer_over_the_cap_to_many_texts_is_split_not_a_failure(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """TEI with --max-client-batch-size 2048 and a 4,096-float model answers a full call with
    ~109 MB of JSON, past the 64 MiB cap: every full burst failed, a malformed answer and a
    failure for the breaker, forever. Here (a 64 KiB cap, 1,000 texts of 8 floats: ~160 KB)
    the call is split in halves until its answers fit, half as many per call is learned, and
    the breaker sees no failure."""
    upstream.max_texts = 1000  # what /info says
    config = provider(
        "p", upstream, "tei", max_response_bytes=64 * 1024, max_wait_ms=300, max_quiet_ms=0
    )
    router = await make_router(config)
    texts = [f"r0 text {i}" for i in range(1000)]
    await burst(router, texts)
    rt = router.runtimes["p"]
    stats = rt.stats()
    assert rt.counters["outcome_malformed"] == 0
    assert stats["health"]["consecutive_failures"] == 0
    learned = stats["max_texts_per_call"]
    assert learned < 1000
    upstream.calls.clear()
    refusals = rt.counters["size_refusals"]
    await burst(router, [f"r1 text {i}" for i in range(1000)])
    assert rt.counters["size_refusals"] == refusals  # cut to fit before any call
    assert max(len(c.texts) for c in upstream.calls) <= learned
