"""An embedplex as another embedplex's ``tei`` provider: the upstream's ``x-compute-tokens``
(TEI's header, which embedplex sends too) is what the router reports, not its estimate.

The upstream is a real server (uvicorn on 127.0.0.1) over fake backends: embedder "a" first,
so TEI's /embed and /info name it, and reranker "r".
"""

from __future__ import annotations

from pathlib import Path

import httpx

from conftest import RouterFactory
from embedplex.config import Settings
from embedplex.core.spend import estimated_tokens
from embedplex.core.types import EmbedRequest, RerankRequest
from embedplex.providers.config import ProviderConfig
from helpers import served
from test_gateway_models import app_of, three
from upstream_fakes import FAST

TEXTS = ["cat dog cat dog", "hello world"]
QUERY = "fox"


async def test_an_embedplex_upstream_reports_exact_token_counts(
    tiny_model_dir: Path, make_router: RouterFactory
) -> None:
    with served(app_of(Settings(), three(tiny_model_dir))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            embed = await client.post("/v1/embeddings", json={"input": TEXTS, "model": "a"})
            rerank = await client.post(
                "/v1/rerank", json={"query": QUERY, "documents": TEXTS, "model": "r"}
            )
        router = await make_router(ProviderConfig(name="up", type="tei", endpoint=url, **FAST))
        embedded = await router.embed(EmbedRequest(inputs=TEXTS), ["up"])
        ranked = await router.rerank(RerankRequest(query=QUERY, texts=TEXTS), ["up"])
    tokens = embed.json()["usage"]["prompt_tokens"]
    pairs = rerank.json()["usage"]["total_tokens"]
    # Without the header the router counts each text's estimate, which differs here.
    assert tokens != sum(estimated_tokens(len(t)) for t in TEXTS)
    assert pairs != sum(estimated_tokens(len(QUERY) + len(t)) for t in TEXTS)
    assert (embedded.provider, embedded.prompt_tokens) == ("up", tokens)
    assert (ranked.provider, ranked.prompt_tokens) == ("up", pairs)
