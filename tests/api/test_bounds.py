"""Every route that takes input bounds it (api/bounds.py): 422 with a clear message, before work.

One app serves an embedding model and a reranker over fake backends, with small limits: three
inputs a request, twenty token ids. Each oversize request must be refused with 422 (TEI's status
for every Validation error since 1.9; 400 on the OpenAI routes, as OpenAI answers it) and must
not have reached a backend (its ``calls`` stay
where they were).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import ModelKind, load_spec
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import ModelConfig, Settings
from embedplex.core.errors import PayloadTooLargeError
from embedplex.gateway import Gateway
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.options import LocalModelOptions
from embedplex.models.rerank import LocalRerankModel
from helpers import running

LIMIT = 3  # max_client_batch_size
TOKENS = 20  # max_request_tokens


@dataclasses.dataclass
class Served:
    client: httpx.AsyncClient
    embedder: FakeBackend
    reranker: FakeBackend

    def batches(self) -> int:
        return len(self.embedder.batches) + len(self.reranker.batches)


@pytest.fixture
async def served(tiny_model_dir: Path) -> AsyncIterator[Served]:
    embedder, reranker = FakeBackend(), FakeBackend(kind=ModelKind.RERANKER)
    settings = Settings(
        max_client_batch_size=LIMIT,
        max_request_tokens=TOKENS,
        models=[
            ModelConfig(name="emb", model_id=str(tiny_model_dir)),
            ModelConfig(name="rr", model_id=str(tiny_model_dir), kind="rerank"),
        ],
    )

    def build(s: Settings) -> Gateway:
        models: list[Any] = []
        for config, backend in zip(s.local_models(), (embedder, reranker), strict=True):
            spec = load_spec(str(tiny_model_dir), tiny_model_dir)
            cls: Any = LocalEmbeddingModel
            if config.kind == "rerank":
                spec, cls = dataclasses.replace(spec, kind=ModelKind.RERANKER), LocalRerankModel
            tokenizer = TextTokenizer.from_dir(
                tiny_model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
            )
            options = LocalModelOptions.from_settings(s, spec, run_tokens=None, model=config)
            models.append(cls(spec, tokenizer, backend, options))
        return Gateway(models)

    async with running(create_app(settings, gateway_factory=build)) as client:
        yield Served(client, embedder, reranker)


FOUR = ["a", "b", "c", "d"]
IDS = [[5] * 8, [6] * 8, [7] * 8]  # three lists (allowed), 24 ids (over 20)

OVERSIZE: list[tuple[str, dict[str, Any]]] = [
    ("/embed", {"inputs": FOUR}),
    ("/embed", {"inputs": IDS}),
    ("/v1/embeddings", {"input": FOUR}),
    ("/v1/embeddings", {"input": IDS}),
    ("/api/v1/embed", {"inputs": FOUR}),
    ("/api/embed", {"texts": FOUR}),
    ("/api/embed/batch", {"input": FOUR}),
    ("/embed_all", {"inputs": FOUR}),
    ("/embed_all", {"inputs": IDS}),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b", "c", "d"]}}),
    ("/tokenize", {"inputs": FOUR}),
    ("/decode", {"ids": [[5], [6], [7], [8]]}),
    ("/decode", {"ids": IDS}),
    ("/rerank", {"query": "q", "texts": FOUR}),
    ("/v1/rerank", {"query": "q", "documents": FOUR}),
    # Counted before any object is made into text (these would be a 422: no "text" field).
    ("/v1/rerank", {"query": "q", "documents": [{"title": t} for t in FOUR]}),
    ("/api/rerank", {"query": "q", "documents": FOUR}),
    ("/v1/embeddings/batch", {"requests": [{"id": str(k), "input": "x"} for k in range(4)]}),
    (
        "/v1/embeddings/batch",
        {"requests": [{"id": "a", "input": ["x", "y"]}, {"id": "b", "input": ["z", "w"]}]},
    ),
    (
        "/v1/embeddings/batch",
        {"requests": [{"id": "a", "input": IDS[:2]}, {"id": "b", "input": IDS[2]}]},
    ),
    ("/v1/embeddings/batch", {"requests": [{"id": str(k), "input": []} for k in range(4)]}),
]


@pytest.mark.parametrize(
    ("path", "body"), OVERSIZE, ids=[f"{p} {i}" for i, (p, _) in enumerate(OVERSIZE)]
)
async def test_oversize_requests_are_refused_before_any_work(
    served: Served, path: str, body: dict[str, Any]
) -> None:
    if "requests" in body:
        body = {"requests": [{**r, "model": "emb"} for r in body["requests"]]}
    else:
        body = {**body, "model": "rr" if "rerank" in path else "emb"}
    r = await served.client.post(path, json=body)
    error = r.json()["error"]
    if path.startswith("/v1/embeddings"):
        assert r.status_code == 400, r.text
        assert error["code"] == "payload_too_large"
        message = error["message"]
    else:
        assert r.status_code == 422, r.text
        message = error
    assert "maximum allowed batch size 3" in message or "limit of 20" in message, message
    assert served.batches() == 0


async def test_at_the_limits_requests_are_served(served: Served) -> None:
    ok = [
        ("/embed", {"inputs": FOUR[:3], "model": "emb"}),
        ("/embed", {"inputs": [[5] * 10, [6] * 10], "model": "emb"}),
        ("/tokenize", {"inputs": ["a b c"], "model": "emb"}),
        ("/decode", {"ids": [[5] * 10, [6] * 10], "model": "emb"}),
        ("/rerank", {"query": "q", "texts": FOUR[:3], "model": "rr"}),
    ]
    for path, body in ok:
        r = await served.client.post(path, json=body)
        assert r.status_code == 200, (path, r.text)


async def test_tokenize_bounds_the_tokens_it_answers_with(served: Served) -> None:
    # Three inputs (allowed), but 3 x 9 tokens with [CLS] and [SEP]: over 20.
    r = await served.client.post(
        "/tokenize", json={"inputs": ["a b c d e f g"] * 3, "model": "emb"}
    )
    assert r.status_code == 422
    assert "27 token ids in one request > the limit of 20" in r.json()["error"]


async def test_tokenize_refuses_an_input_over_its_character_limit(served: Served) -> None:
    """/tokenize answers every token, so an input over max_input_length x 250 characters is
    refused (as TEI refuses it) before anything is tokenized: 2 MB took seconds."""
    r = await served.client.post("/tokenize", json={"inputs": ["a", "b " * 5_000], "model": "emb"})
    assert r.status_code == 422
    body = r.json()
    assert body["error_type"] == "Validation"
    assert body["error"].startswith("input 1 has 10000 characters, more than the maximum of 8000")


async def test_a_long_text_with_truncation_off_is_refused_from_its_part(served: Served) -> None:
    r = await served.client.post(
        "/embed", json={"inputs": ["a", "b " * 500_000], "truncate": False, "model": "emb"}
    )
    assert r.status_code == 422
    assert r.json()["error_type"] == "Validation"
    assert "input 1 has at least" in r.json()["error"]
    assert "more than the maximum of 32" in r.json()["error"]
    assert served.batches() == 0


async def test_a_local_model_refuses_a_tokenize_answer_as_it_tokenizes(
    tiny_model_dir: Path,
) -> None:
    """The model holds the request's token limit: a /tokenize over it stops at the group of
    inputs that passes it (the route alone could only check once all was tokenized)."""
    from helpers import fake_model

    model = fake_model(tiny_model_dir, Settings(max_request_tokens=TOKENS), FakeBackend())
    assert model.options.max_request_tokens == TOKENS
    seen: list[int] = []
    tokens = model.tokenizer.tokens

    def spy(texts: list[str], **kwargs: Any) -> Any:
        seen.append(kwargs["max_tokens"])
        return tokens(texts, **kwargs)

    model.tokenizer.tokens = spy  # type: ignore[method-assign]
    await model.start()
    try:
        with pytest.raises(PayloadTooLargeError, match="token ids in one request > the limit"):
            await model.tokenize(["a b c d e f g"] * 3)
    finally:
        await model.close()
    assert seen == [TOKENS]
