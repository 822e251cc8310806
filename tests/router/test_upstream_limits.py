"""What an upstream takes per call, learned and honoured: TEI's batch limit (its /info, read
beside the embed path and again when due, and its refusals), the vendors' caps on the tokens
of one call (Voyage, OpenAI), base URLs with a prefix, and Cohere v1's missing dimensions.

Every upstream is a real HTTP fake speaking the vendor's shape and its words for a refusal.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import orjson
import pytest
from starlette.responses import Response

import upstream_fakes
from conftest import RouterFactory
from embedplex.cache import EmbeddingCache
from embedplex.core.errors import InvalidRequestError, UpstreamError
from embedplex.core.types import EmbedRequest
from embedplex.providers import PROVIDER_TYPES
from embedplex.providers.adapter import resolve_url, size_refusal
from embedplex.providers.base import budget_tokens
from embedplex.providers.config import ProviderConfig
from embedplex.providers.openai import OpenAIProvider
from embedplex.providers.router import Router
from embedplex.providers.voyage import VoyageProvider
from helpers import eventually
from upstream_fakes import FakeUpstream, fake_tokens, provider, vector_for


def req(*texts: str, **kw: object) -> EmbedRequest:
    return EmbedRequest(inputs=list(texts), **kw)  # type: ignore[arg-type]


def check(vectors: list[np.ndarray], texts: list[str]) -> None:
    for v, t in zip(vectors, texts, strict=True):
        np.testing.assert_array_equal(v, vector_for(t))


async def burst(router: Router, name: str, texts: list[str]) -> None:
    """One caller per text, all at once; every one must get its own vector."""
    results = await asyncio.gather(*(router.embed(req(t), [name]) for t in texts))
    for result, text in zip(results, texts, strict=True):
        check(result.vectors, [text])


def words(i: int, n: int = 100) -> str:
    """A text of ``n`` words, as long as any other of ``n``."""
    return " ".join(f"w{i:04d}x{j:03d}" for j in range(n))


# -- Cohere v1 -----------------------------------------------------------------------------


async def test_cohere_v1_refuses_dimensions_before_any_call(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """v1's /embed has no output_dimension: answering the full width (and caching it under
    the width asked for) is refused instead, as any parameter a provider cannot honour."""
    router = await make_router(
        provider("co1", upstream, "cohere", endpoint=upstream.url + "/v1/embed"),
        provider("co2", upstream, "cohere"),
    )
    with pytest.raises(InvalidRequestError, match="cohere v1") as refused:
        await router.embed(req("hello", dimensions=4), ["co1"])
    assert refused.value.param == "dimensions"
    assert upstream.calls == []
    v2 = await router.embed(req("hello", dimensions=4), ["co2"])
    assert upstream.calls[0].body["output_dimension"] == 4
    assert v2.vectors[0].shape == (4,)
    check((await router.embed(req("hello"), ["co1"])).vectors, ["hello"])  # v1 still embeds


# -- base URLs -----------------------------------------------------------------------------


# (endpoint, the adapter's path, the URL called): a base URL is one with no path or one that
# ends in an API version, wherever it sits; anything else is the full URL.
BASE_URLS = [
    ("http://h/inference/v1", "/v1/embeddings", "http://h/inference/v1/embeddings"),
    ("http://h/openai/v1/", "/v1/embeddings", "http://h/openai/v1/embeddings"),
    ("http://h/api/v1?key=k", "/v1/embeddings", "http://h/api/v1/embeddings?key=k"),
    ("http://h/co/v1", "/v2/embed", "http://h/co/v1/embed"),  # Cohere's v1, as named
    ("http://h/co/v2", "/v2/embed", "http://h/co/v2/embed"),
    ("http://h:1", "/v1/embeddings", "http://h:1/v1/embeddings"),
    ("http://h:1/", "/embed", "http://h:1/embed"),
    ("http://h/v1", "/v1/embeddings", "http://h/v1/embeddings"),
    ("http://h/x/v1/embeddings", "/v1/embeddings", "http://h/x/v1/embeddings"),
    ("http://h/custom/path", "/v1/embeddings", "http://h/custom/path"),
    ("http://h/tei/v1", "/embed", "http://h/tei/v1"),  # TEI's path has no version
    ("http://h/v1beta/", "/v1/embeddings", "http://h/v1beta/embeddings"),
    ("http://h/api/v2alpha1?k=1", "/v2/embed", "http://h/api/v2alpha1/embed?k=1"),
    ("http://h/v1/openai", "/v1/embeddings", "http://h/v1/openai"),  # not for every type
]


def test_a_base_url_gets_the_adapters_path_after_its_version() -> None:
    called = [resolve_url(endpoint, None, path) for endpoint, path, _ in BASE_URLS]
    assert called == [expected for _, _, expected in BASE_URLS]


# (endpoint, the URL an openai provider calls): hosts that serve an OpenAI-compatible API
# beside their own give its base URL ending in ``/openai``.
OPENAI_BASE_URLS = [
    ("https://api.deepinfra.com/v1/openai", "https://api.deepinfra.com/v1/openai/embeddings"),
    (
        "https://generativelanguage.googleapis.com/v1beta/openai/?key=k",
        "https://generativelanguage.googleapis.com/v1beta/openai/embeddings?key=k",
    ),
    ("https://h/v1beta", "https://h/v1beta/embeddings"),
    ("https://h/openai/v1", "https://h/openai/v1/embeddings"),
    ("https://h/openai/embeddings", "https://h/openai/embeddings"),  # a full URL
    ("https://h/openai/deployments/d/embeddings", "https://h/openai/deployments/d/embeddings"),
]


def test_an_openai_base_url_may_end_in_openai_or_a_versions_tag() -> None:
    """DeepInfra's ``/v1/openai`` and Gemini's ``/v1beta/openai/`` were taken for the full
    URL of the calls, and every call went to a path that is no API (404)."""
    client = httpx.AsyncClient()

    def url(endpoint: str) -> str:
        config = ProviderConfig(name="p", type="openai", endpoint=endpoint)
        return OpenAIProvider(config, client).url

    assert [url(endpoint) for endpoint, _ in OPENAI_BASE_URLS] == [
        called for _, called in OPENAI_BASE_URLS
    ]


async def test_a_base_url_with_a_prefix_is_called_at_its_embeddings_path(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """Fireworks, Groq and DeepInfra give base URLs like ``https://host/inference/v1``."""
    router = await make_router(provider("fw", upstream, endpoint=upstream.url + "/inference/v1"))
    check((await router.embed(req("hi"), ["fw"])).vectors, ["hi"])
    assert [c.path for c in upstream.calls] == ["/inference/v1/embeddings"]
    adapter = router.runtimes["fw"].provider
    assert adapter.rerank_url == upstream.url + "/inference/v1/rerank"  # type: ignore[attr-defined]


# -- TEI's batch limit ---------------------------------------------------------------------


async def test_tei_reads_info_beside_its_embed_path(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    upstream.max_texts = 5
    router = await make_router(provider("t", upstream, "tei", endpoint=upstream.url + "/tei/embed"))
    assert upstream.info_paths == ["/tei/info"]
    assert router.runtimes["t"].stats()["max_texts_per_call"] == 5


async def test_tei_down_at_start_reads_info_before_a_later_call(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """An /info that could not be read at start is read before the next call: its limit and
    what it serves hold from then on, and the call cut before it is split to fit."""
    upstream.max_texts = 4
    upstream.tei_refusal = True
    upstream.info_status = 503
    router = await make_router(provider("t", upstream, "tei", max_wait_ms=200, max_quiet_ms=0))
    rt = router.runtimes["t"]
    assert rt.stats()["max_texts_per_call"] == 32  # TEI's default until /info is read
    upstream.info_status = 200
    await burst(router, "t", [f"a{i}" for i in range(12)])
    assert [len(c.texts) for c in upstream.calls] == [12, 4, 4, 4]  # cut before it was read
    stats = rt.stats()
    assert stats["max_texts_per_call"] == 4
    assert (stats["aimd"]["ceiling"], stats["max_batch_requests"]) == (4, 4)
    assert rt.provider.served == "fake@None"  # type: ignore[attr-defined]
    await burst(router, "t", [f"b{i}" for i in range(12)])
    assert [len(c.texts) for c in upstream.calls[4:]] == [4, 4, 4]  # no refusal since


async def test_tei_learns_its_limit_from_a_refusal_and_fails_no_caller(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """No /info to read (a proxy that passes /embed only): TEI's refusal, "batch size 32 >
    maximum allowed batch size 2" (422), is its limit. It cuts the refused call, outside the
    few calls a bad input may cost (halving 32 texts down to 2 takes 30), and every later one."""
    upstream.max_texts = 2
    upstream.tei_refusal = True
    upstream.info_status = 404
    router = await make_router(provider("t", upstream, "tei", max_wait_ms=200, max_quiet_ms=0))
    await burst(router, "t", [f"a{i}" for i in range(32)])
    assert [len(c.texts) for c in upstream.calls] == [32] + [2] * 16
    rt = router.runtimes["t"]
    assert rt.stats()["max_texts_per_call"] == 2
    assert rt.stats()["aimd"]["ceiling"] == 2
    await burst(router, "t", [f"b{i}" for i in range(8)])
    assert [len(c.texts) for c in upstream.calls[17:]] == [2] * 4


async def test_tei_answers_are_kept_under_what_info_says_it_serves(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """The cache keys a TEI provider's texts by what /info says it serves: once it has said
    (its /info down at start, read beside a later call), texts are keyed by it, and what was
    kept before it said is not answered under it."""
    upstream.info_status = 503
    cache = EmbeddingCache(1 << 20)
    router = await make_router(provider("t", upstream, "tei"), cache=cache)
    adapter = router.runtimes["t"].provider
    upstream.info_status = 200
    check((await router.embed(req("hello"), ["t"])).vectors, ["hello"])
    await eventually(lambda: adapter.served is not None)  # type: ignore[attr-defined]
    assert adapter.served == "fake@None"  # type: ignore[attr-defined]
    for _ in range(2):
        check((await router.embed(req("hello"), ["t"])).vectors, ["hello"])
    assert len(upstream.calls) == 2  # asked again under what it serves, and kept


async def test_a_tei_refusal_reads_info_again_and_its_new_model_gets_new_keys(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """A refusal of the call's size says the upstream changed (redeployed, maybe with another
    model): /info is read again, and texts are kept under what it serves now."""
    cache = EmbeddingCache(1 << 20)
    config = provider("t", upstream, "tei", max_wait_ms=200, max_quiet_ms=0)
    router = await make_router(config, cache=cache)
    await router.embed(req("hello"), ["t"])
    await router.embed(req("hello"), ["t"])
    assert len(upstream.calls) == 1  # kept
    upstream.model_id, upstream.max_texts, upstream.tei_refusal = "other", 2, True
    await burst(router, "t", ["a", "b", "c", "d"])
    tei = router.runtimes["t"].provider
    # /info is read again in the background, never holding a call (tests/router/test_tei_info.py)
    await eventually(lambda: tei.served == "other@None")  # type: ignore[attr-defined]
    assert upstream.info_paths == ["/info", "/info"]
    calls = len(upstream.calls)
    await router.embed(req("hello"), ["t"])
    assert len(upstream.calls) == calls + 1  # not the other model's vector


# -- caps on the tokens of one call --------------------------------------------------------


@pytest.mark.parametrize("kind", ["voyage", "openai"])
async def test_a_burst_over_the_upstreams_token_cap_answers_every_caller(
    kind: str, upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """128 callers, each text well within the cap alone, together 22x over it: the upstream's
    400 ("max allowed tokens per submitted batch is 2000. Your batch has 44800 tokens", or
    OpenAI's "Requested 44800 tokens, max 2000 tokens per request") is a refusal of the call's
    size, not of an input: the call is cut to fit what it said, and so is every later one."""
    upstream.max_batch_tokens = 2000
    # No cap told (a local OpenAI-compatible server has none; Voyage's 120,000 is set aside):
    # what the refusal says is all there is (a told cap bounds what a refusal may teach).
    config = provider("p", upstream, kind, max_wait_ms=200, max_quiet_ms=0, max_batch_tokens=0)
    router = await make_router(config)
    texts = [words(i) for i in range(128)]
    await burst(router, "p", texts)
    rt = router.runtimes["p"]
    assert rt.counters["size_refusals"] == 1
    assert all(sum(map(fake_tokens, c.texts)) <= 2000 for c in upstream.calls[1:])
    per_call = 2000 // fake_tokens(texts[0])
    assert len(upstream.calls) <= 1 + math.ceil(128 / (per_call - 1))
    budget = rt.stats()["max_tokens_per_call"]
    assert budget is not None and budget < sum(map(budget_tokens, texts))
    # Later bursts are cut by what was learned: no refusal again.
    upstream.calls.clear()
    await burst(router, "p", [words(i + 1000) for i in range(128)])
    assert rt.counters["size_refusals"] == 1
    assert all(sum(map(fake_tokens, c.texts)) <= 2000 for c in upstream.calls)


async def test_max_batch_tokens_cuts_batches_before_the_upstream_refuses(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    upstream.max_batch_tokens = 3000
    config = provider("p", upstream, max_batch_tokens=1000, max_wait_ms=200, max_quiet_ms=0)
    router = await make_router(config)
    texts = [words(i, 40) for i in range(64)]
    await burst(router, "p", texts)
    assert router.runtimes["p"].counters["size_refusals"] == 0
    assert all(sum(map(budget_tokens, c.texts)) <= 1000 for c in upstream.calls)
    per_call = 1000 // budget_tokens(texts[0])
    assert len(upstream.calls) == math.ceil(64 / per_call)


async def test_a_voyage_call_carries_up_to_its_documented_1000_texts(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """Voyage takes 1,000 texts a call (its API reference; 128 was an older figure): 300
    short texts under its token cap make one call, not three."""
    upstream.max_texts = 1000  # over it, the fake refuses the call (413)
    config = provider("v", upstream, "voyage", max_wait_ms=1000, max_quiet_ms=200)
    router = await make_router(config)
    assert router.runtimes["v"].stats()["max_texts_per_call"] == 1000
    await burst(router, "v", [f"text {i}" for i in range(300)])
    assert [len(c.texts) for c in upstream.calls] == [300]


def _mistral(path: str, model: str | None, cap: int, sent: int) -> Response:
    """Mistral's refusal of a call over its cap on tokens today: 400, no numbers."""
    error = {
        "object": "error",
        "message": "Too many tokens overall, split into more batches.",
        "type": "invalid_request_prompt",
        "param": None,
        "code": "3210",
    }
    return Response(orjson.dumps(error), status_code=400, media_type="application/json")


async def test_a_refusal_that_says_too_many_tokens_without_numbers_is_of_the_calls_size(
    upstream: FakeUpstream, make_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mistral's 400 "Too many tokens overall, split into more batches." names no cap: it was
    taken for one caller's bad input and bisected until the bound on that ran out (104 of 128
    valid callers got 502). It is a refusal of the call's size: the call is split in halves
    outside that bound, half the tokens it sent are learned each time, and later bursts are
    cut to fit before any call."""
    monkeypatch.setattr(upstream_fakes, "_refuse_tokens", _mistral)
    upstream.max_batch_tokens = 2000
    router = await make_router(provider("m", upstream, max_wait_ms=200, max_quiet_ms=0))
    await burst(router, "m", [words(i) for i in range(128)])
    rt = router.runtimes["m"]
    refusals = rt.counters["size_refusals"]
    assert refusals >= 1
    budget = rt.stats()["max_tokens_per_call"]
    assert budget is not None and budget <= 2000 * 3 // 2  # our reckoning of the fake's cap
    upstream.calls.clear()
    await burst(router, "m", [words(i + 1000) for i in range(128)])
    assert rt.counters["size_refusals"] == refusals
    assert all(sum(map(fake_tokens, c.texts)) <= 2000 for c in upstream.calls)


def test_the_vendors_words_for_a_call_too_large_are_read() -> None:
    def said(status: int, reason: str) -> tuple[int | None, int | None, int | None] | None:
        refusal = size_refusal(
            UpstreamError(f"p: upstream answered {status}: {reason}", status=status)
        )
        return None if refusal is None else tuple(refusal)  # type: ignore[return-value]

    voyage = (
        "Request to model 'voyage-3-large' failed. The max allowed tokens per submitted batch "
        "is 120000. Your batch has 124302 tokens after truncation. Please lower the number"
    )
    assert said(400, voyage) == (None, 120000, 124302)
    assert said(400, voyage.split(" Your")[0]) == (None, 120000, None)  # cut off
    openai = "Requested 453357 tokens, max 300000 tokens per request"
    assert said(400, openai) == (None, 300000, 453357)
    tei = "batch size 64 > maximum allowed batch size 32"
    assert said(422, tei) == said(413, tei) == (32, None, None)
    assert said(400, "Too many tokens in batch. Max is 16384 got 17555") == (None, 16384, 17555)
    # Words without numbers (Mistral's since 2025, code 3210), and the like: too large, no more.
    assert said(400, "Too many tokens overall, split into more batches.") == (None, None, None)
    assert said(400, "Too many tokens in batch") == (None, None, None)  # its numbers cut off
    assert said(413, "Batch is too large; split it into smaller requests") == (None, None, None)
    assert said(400, "Too many inputs: 3000 > 2048") == (None, None, None)
    # An input's own refusal, in the words of several servers, stays an input's.
    for one in (
        "Input is too long: 9000 tokens, this model takes 8192",
        "Input validation error: `inputs` must have less than 512 tokens. Given: 600",
        "The input token count (9000) exceeds the maximum number of tokens allowed (8192).",
        "Too many tokens in input 3: 9000 > 8192",
    ):
        assert said(400, one) is None, one
    # One input's refusal is not the call's size: it is isolated as before.
    assert said(400, "This model's maximum context length is 8192 tokens") is None
    assert said(500, tei) is None


def test_each_vendors_token_cap_is_the_default() -> None:
    client = httpx.AsyncClient()

    def cap(kind: type[OpenAIProvider | VoyageProvider], **kw: object) -> int | None:
        config = ProviderConfig(name="p", type=kind.type, **kw)  # type: ignore[arg-type]
        return kind(config, client).limits.max_tokens

    assert cap(OpenAIProvider) == 300_000  # api.openai.com
    assert cap(OpenAIProvider, endpoint="http://127.0.0.1:9/v1") is None  # vLLM, Infinity...
    assert cap(OpenAIProvider, endpoint="http://127.0.0.1:9/v1", max_batch_tokens=5000) == 5000
    assert cap(OpenAIProvider, max_batch_tokens=0) is None  # 0: no cap
    assert cap(VoyageProvider) == 320_000  # voyage-3.5, the default model
    assert cap(VoyageProvider, model="voyage-3-large") == 120_000
    assert cap(VoyageProvider, model="voyage-code-3") == 120_000
    assert cap(VoyageProvider, model="voyage-3.5-lite") == 1_000_000
    assert cap(VoyageProvider, model="voyage-something-new") == 120_000  # the least


def test_each_vendors_rerank_token_cap_is_the_default() -> None:
    """Voyage caps a rerank call's tokens by model (its reranker API reference); the others
    document no such cap."""
    client = httpx.AsyncClient()

    def cap(kind: str, **kw: object) -> int | None:
        config = ProviderConfig(name="p", type=kind, endpoint="http://127.0.0.1:9", **kw)  # type: ignore[arg-type]
        return PROVIDER_TYPES[kind](config, client).limits.max_rerank_tokens

    assert cap("voyage") == 600_000  # rerank-2.5, the default rerank model
    assert cap("voyage", rerank_model="rerank-2-lite") == 600_000
    assert cap("voyage", rerank_model="rerank-1") == 300_000
    assert cap("voyage", rerank_model="rerank-lite-1") == 300_000
    assert cap("voyage", rerank_model="rerank-something-new") == 300_000  # the least
    assert cap("voyage", max_rerank_tokens=0) is None  # 0: no cap
    assert cap("voyage", max_rerank_tokens=5000) == 5000
    for kind in ("tei", "openai", "cohere"):
        assert cap(kind) is None
        assert cap(kind, max_rerank_tokens=7000) == 7000
