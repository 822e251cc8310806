"""One caller's bad input, or one upstream's bad answer, stays that caller's (review fixes).

Against the real local fakes (``upstream_fakes``): a text the upstream refuses fails alone
(the batch is split), answers with wrong indexes or widths are malformed, an upstream that
trickles bytes times out, a failed ``any`` gives each caller its own error, a Retry-After of
inf is no wait, and a key in an endpoint's query is never shown.
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

from conftest import RouterFactory
from embedplex.api.errors import error_response, spec_for
from embedplex.config import Settings
from embedplex.core.errors import RateLimitedError, UpstreamError, UpstreamRefusedError
from embedplex.core.types import EmbedRequest
from embedplex.providers.config import RouteConfig
from embedplex.providers.http import parse_retry_after
from embedplex.providers.router import RemoteModel
from upstream_fakes import DIM, FakeUpstream, Fault, provider, vector_for

LONG = "x" * 500


def req(*texts: str, **kw: object) -> EmbedRequest:
    return EmbedRequest(inputs=list(texts), cache=False, **kw)  # type: ignore[arg-type]


async def embed_all(router: object, texts: list[str], name: str = "p") -> list[object]:
    return await asyncio.gather(
        *(router.embed(req(t), [name]) for t in texts),  # type: ignore[attr-defined]
        return_exceptions=True,
    )


@pytest.mark.parametrize("kind", ["openai", "tei", "tei-before-2026-02"])
async def test_a_refused_text_fails_alone_as_a_422(
    kind: str, upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """A TEI before 2026-02 refuses an input over its length with 413, as if the call were
    too large: the call is cut in halves until the input is alone, and a one-input call it
    still refuses is that input's 422 (it was a 502)."""
    upstream.max_chars = 100
    if kind == "tei-before-2026-02":
        kind, upstream.tei_validation_status = "tei", 413
    router = await make_router(provider("p", upstream, kind, max_wait_ms=200, max_batch_size=8))
    texts = ["a", "b", LONG, "c", "d", "e", "f", "g"]
    outcomes = await embed_all(router, texts)
    for text, out in zip(texts, outcomes, strict=True):
        if text == LONG:
            assert isinstance(out, UpstreamRefusedError), out
            assert spec_for(out).status == 422
            assert "context length" in out.message or "Input validation" in out.message
        else:
            assert not isinstance(out, BaseException), out
            assert out.vectors[0].tobytes() == vector_for(text).tobytes()  # type: ignore[attr-defined]
    sizes = [len(c.texts) for c in upstream.calls]
    assert sizes[0] == 8
    assert len(sizes) - 1 <= 2 * math.ceil(math.log2(8))  # 2*log2(n) extra calls per bad text
    rt = router.runtimes["p"]
    assert rt.health.consecutive_failures == 0  # refusals are not the upstream's failures
    assert rt.health.state.value == "closed"


async def test_splits_on_refusal_are_bounded(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    upstream.max_chars = 0  # every text refused (as for parameters the upstream rejects)
    router = await make_router(provider("p", upstream, max_wait_ms=200, max_batch_size=16))
    outcomes = await embed_all(router, [f"t{i}" for i in range(16)])
    assert all(isinstance(o, UpstreamError | UpstreamRefusedError) for o in outcomes)
    # Splitting every text out would cost 31 calls; the bound is two bad texts' worth.
    assert len(upstream.calls) == 1 + 2 * 2 * math.ceil(math.log2(16))
    assert router.runtimes["p"].health.consecutive_failures == 0


async def test_splits_on_refusal_share_the_retry_budget(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    upstream.max_chars = 100
    upstream.delay = 0.2
    config = provider("p", upstream, max_wait_ms=200, max_batch_size=4, retry_budget_s=0.55)
    router = await make_router(config)
    outcomes = await embed_all(router, ["a", "b", "c", LONG])
    # 0.2 s for the batch, 0.2 s for its halves: what is left of the budget (0.55 s) would not
    # hold another such call, so no more splits (each half's own budget would have allowed two
    # more calls); nothing was sent to time out.
    assert len(upstream.calls) == 3
    assert [isinstance(o, BaseException) for o in outcomes] == [False, False, True, True]
    assert router.runtimes["p"].counters["outcome_timeout"] == 0
    assert router.runtimes["p"].health.consecutive_failures == 0


async def test_a_refusal_fails_over_under_any(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    upstream.max_chars = 100
    router = await make_router(provider("p", upstream), provider("q", upstream2))
    result = await router.embed(req(LONG), ["p", "q"])
    assert result.provider == "q"


@pytest.mark.parametrize("how", ["dup_index", "out_of_range", "ragged"])
@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_wrong_rows_are_a_malformed_answer(
    how: str, encoding: str, upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream, encoding_format=encoding, max_attempts=1))
    upstream.script(Fault(bad_rows=how))
    with pytest.raises(UpstreamError, match="malformed"):
        await router.embed(req("a", "b", "c"), ["p"])
    assert router.runtimes["p"].counters["outcome_malformed"] == 1


async def test_vectors_of_another_width_than_asked_are_malformed(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream, max_attempts=1))
    assert len((await router.embed(req("a", dimensions=4), ["p"])).vectors[0]) == 4
    upstream.ignore_dimensions = True  # answers DIM wide whatever was asked
    with pytest.raises(UpstreamError, match=f"width {DIM}, asked for 4"):
        await router.embed(req("b", dimensions=4), ["p"])


async def test_a_trickling_upstream_times_out_and_any_fails_over(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    slow = provider("p", upstream, timeout_s=0.5, retry_budget_s=1.0, max_attempts=2)
    router = await make_router(slow, provider("q", upstream2))
    upstream.script(*[Fault(drip=0.05)] * 2)
    began = time.monotonic()
    result = await router.embed(req("a"), ["p", "q"])
    assert result.provider == "q"
    assert time.monotonic() - began < 3.0  # the budget (1 s) and a little, not the drip's 5000 s
    assert router.runtimes["p"].counters["outcome_timeout"] >= 1


async def test_each_caller_of_a_failed_any_gets_its_own_bounded_error(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    kw = {"max_attempts": 1, "max_wait_ms": 100, "breaker_failures": 100}
    router = await make_router(provider("p", upstream, **kw), provider("q", upstream2, **kw))
    upstream.script(Fault(status=500))
    upstream2.script(Fault(status=500))
    model = RemoteModel(router, RouteConfig(model="m", providers=["p", "q"]))
    outcomes = await asyncio.gather(
        *(model.embed(req(f"t{i}")) for i in range(20)), return_exceptions=True
    )
    assert len(upstream.calls) == len(upstream2.calls) == 1  # one batch each
    messages = {str(o) for o in outcomes}
    assert len(messages) == 1
    (message,) = messages
    assert message.count("every provider failed") == 1
    assert len(message) < 200
    assert len({id(o) for o in outcomes}) == 20  # not one object shared by all
    cause = outcomes[0].__cause__  # type: ignore[union-attr]
    assert (
        isinstance(cause, UpstreamError)
        and cause.message == "q: upstream answered 500: injected 500"
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "inf"}, None),
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after-ms": "inf", "retry-after": "3"}, 3.0),
        ({"retry-after": "1e9"}, 86400.0),
        ({"retry-after": "Wed, 21 Oct 2099 07:28:00 GMT"}, 86400.0),
        ({"retry-after": "2"}, 2.0),
    ],
)
def test_retry_after_is_finite_and_at_most_a_day(
    headers: dict[str, str], expected: float | None
) -> None:
    assert parse_retry_after(httpx.Headers(headers)) == expected


def test_an_infinite_retry_after_still_answers() -> None:
    for wait in (math.inf, math.nan):
        response = error_response(RateLimitedError("slow down", retry_after=wait), "/v1/embeddings")
        assert response.status_code == 429
        assert response.headers["retry-after"] == "86400"


async def test_a_key_in_the_endpoint_query_is_never_shown(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    endpoint = f"{upstream.url}/v1/embeddings?key=sk-live-SECRET123&api-version=2024"
    config = provider("g", upstream, endpoint=endpoint)
    router = await make_router(config)
    assert (await router.embed(req("a"), ["g"])).vectors  # the key still goes upstream
    assert upstream.calls[0].path == "/v1/embeddings"
    shown = router.runtimes["g"].stats()["endpoint"]
    assert shown == f"{upstream.url}/v1/embeddings?key=***&api-version=***"
    settings = Settings(
        local_model=False, providers=[config], routes=[RouteConfig(model="m", providers=["g"])]
    )
    assert "SECRET123" not in str(settings.redacted())
