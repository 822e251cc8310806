"""Several models in one gateway (fake backends): names, kinds, allowed lists, /info, lazy load."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import ModelKind, Pooling, load_spec
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import ModelConfig, Settings
from embedplex.core.cores import process_cores
from embedplex.core.errors import (
    FatalBackendError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
)
from embedplex.core.types import ServedModel
from embedplex.gateway import Gateway
from embedplex.gateway.allowed import AllowedModels
from embedplex.gateway.build import placeholder
from embedplex.gateway.lazy import LazyModel
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.local import LocalModel
from embedplex.models.options import LocalModelOptions
from embedplex.models.rerank import LocalRerankModel
from helpers import eventually, parse_metrics, running


def local(
    model_dir: Path, settings: Settings, config: ModelConfig, backend: FakeBackend
) -> LocalModel[object]:
    """A local model of ``config``'s kind over a fake backend (the tiny BERT's tokenizer)."""
    spec = load_spec(
        str(model_dir), model_dir, pooling=Pooling(config.pooling) if config.pooling else None
    )
    if config.kind == "rerank":
        spec = dataclasses.replace(spec, kind=ModelKind.RERANKER)
    tokenizer = TextTokenizer.from_dir(
        model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
    )
    config = config.resolved(settings)
    options = LocalModelOptions.from_settings(settings, spec, run_tokens=None, model=config)
    cls = LocalRerankModel if config.kind == "rerank" else LocalEmbeddingModel
    return cls(spec, tokenizer, backend, options)  # type: ignore[return-value]


def app_of(settings: Settings, build: Callable[[Settings], list[ServedModel]]) -> FastAPI:
    allowed = AllowedModels.from_settings(settings)
    return create_app(settings, gateway_factory=lambda s: Gateway(build(s), allowed=allowed))


def three(model_dir: Path) -> Callable[[Settings], list[ServedModel]]:
    """Embedders "a" (16 dims) and "b" (8 dims, at most 2 inputs a request, last-token
    pooling), reranker "r"."""

    def build(s: Settings) -> list[ServedModel]:
        return [
            local(model_dir, s, ModelConfig(name="a", model_id="x"), FakeBackend(16)),
            local(
                model_dir,
                s,
                ModelConfig(
                    name="b",
                    model_id="x",
                    max_client_batch_size=2,
                    max_batch_requests=4,
                    pooling="last-token",
                ),
                FakeBackend(8),
            ),
            local(
                model_dir,
                s,
                ModelConfig(name="r", model_id="x", kind="rerank"),
                FakeBackend(kind=ModelKind.RERANKER),
            ),
        ]

    return build


async def test_each_model_answers_by_name_and_the_rest_is_refused_clearly(
    tiny_model_dir: Path,
) -> None:
    async with running(app_of(Settings(), three(tiny_model_dir))) as client:
        a = await client.post("/v1/embeddings", json={"input": ["hello"], "model": "a"})
        b = await client.post("/v1/embeddings", json={"input": ["hello"], "model": "b"})
        tei_b = await client.post("/embed", json={"inputs": "hello", "model": "b"})
        tei_default = await client.post("/embed", json={"inputs": "hello"})
        rerank = await client.post(
            "/rerank", json={"query": "fox", "texts": ["the fox", "a dog"], "model": "r"}
        )
        unknown = await client.post("/v1/embeddings", json={"input": ["x"], "model": "nope"})
        # A caller's name is repeated in the error by its head: a 100 KB name, a 404 of ~200 B.
        huge = await client.post("/v1/embeddings", json={"input": ["x"], "model": "n" * 100_000})
        wrong_kind = await client.post("/v1/embeddings", json={"input": ["x"], "model": "r"})
        rerank_wrong = await client.post(
            "/rerank", json={"query": "q", "texts": ["t"], "model": "a"}
        )
        too_many_b = await client.post("/embed", json={"inputs": ["a", "b", "c"], "model": "b"})
        three_a = await client.post("/embed", json={"inputs": ["a", "b", "c"], "model": "a"})
        listed = (await client.get("/v1/models")).json()["data"]
    assert a.status_code == b.status_code == 200
    assert (a.json()["model"], len(a.json()["data"][0]["embedding"])) == ("a", 16)
    assert (b.json()["model"], len(b.json()["data"][0]["embedding"])) == ("b", 8)
    assert len(tei_b.json()[0]) == 8
    assert len(tei_default.json()[0]) == 16  # no name: the first embedder
    assert rerank.status_code == 200 and len(rerank.json()) == 2
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert (
        "'nope' is not served here (embedding models served: a, b)"
        in (unknown.json()["error"]["message"])
    )
    assert huge.status_code == 404 and len(huge.content) < 400
    assert f"{'n' * 120!r}... (100,000 characters) is not served" in huge.json()["error"]["message"]
    assert wrong_kind.status_code == 400  # OpenAI's status (TEI's 422 below)
    assert "'r' is a reranker model" in wrong_kind.json()["error"]["message"]
    assert rerank_wrong.status_code == 422
    assert too_many_b.status_code == 422  # b's own max_client_batch_size
    assert three_a.status_code == 200
    assert [(m["id"], m["kind"]) for m in listed] == [
        ("a", "embed"),
        ("b", "embed"),
        ("r", "rerank"),
    ]


async def test_a_rerank_is_timed_like_an_embed(tiny_model_dir: Path) -> None:
    """The rerank routes never noted their timings: the access log said queue=0.0ms
    inference=0.0ms, and no stage histogram had a series for a reranker."""

    def build(s: Settings) -> list[ServedModel]:
        config = ModelConfig(name="r", model_id="x", kind="rerank")
        return [local(tiny_model_dir, s, config, FakeBackend(kind=ModelKind.RERANKER, delay=0.05))]

    async with running(app_of(Settings(), build)) as client:
        r = await client.post("/rerank", json={"query": "fox", "texts": ["the fox", "a dog"]})
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert r.status_code == 200, r.text
    for stage in ("tokenization", "queue", "inference"):
        count = (f"embedplex_{stage}_duration_seconds_count", (("model", "r"),))
        assert metrics.get(count) == 1.0, stage
    inference = metrics[("embedplex_inference_duration_seconds_sum", (("model", "r"),))]
    assert inference >= 0.04  # the fake pass sleeps 50 ms


async def test_info_describes_the_model_asked_for(tiny_model_dir: Path) -> None:
    settings = Settings(max_batch_requests=64)
    app = app_of(settings, three(tiny_model_dir))
    async with running(app) as client:
        first = (await client.get("/info")).json()
        pool = app.state.gateway.services()[0]._token_pool
        b = (await client.get("/info", params={"model": "b"})).json()
        r = (await client.get("/info", params={"model": "r"})).json()
        missing = await client.get("/info", params={"model": "zzz"})
    assert (first["served_model_name"], first["dimensions"]) == ("a", 16)
    assert first["max_batch_requests"] == 64  # the top level's, a's own left unset
    assert (b["served_model_name"], b["dimensions"], b["max_batch_requests"]) == ("b", 8, 4)
    assert b["max_client_batch_size"] == 2
    assert b["max_batch_tokens"] == settings.max_batch_tokens  # fake: no per-pass cut
    # TEI's ModelType: its pooling names (last_token), a reranker's labels (transformers' own
    # for one label: this one's config is an embedding model's).
    assert first["model_type"] == {"embedding": {"pooling": "mean"}}
    assert b["model_type"] == {"embedding": {"pooling": "last_token"}}
    assert r["model_type"] == {
        "reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    }
    # An integer, as TEI's Info has it (not null): the tokenizer threads, one a core unset.
    assert first["tokenization_workers"] == process_cores() == pool._max_workers
    assert missing.status_code == 404
    assert "served: a, b, r" in missing.json()["error"]


async def test_one_model_stands_in_for_any_name_unless_a_list_is_set(
    tiny_model_dir: Path,
) -> None:
    def one(s: Settings) -> list[ServedModel]:
        return [local(tiny_model_dir, s, ModelConfig(name="a", model_id="x"), FakeBackend())]

    sdk_default = {"input": ["hello"], "model": "text-embedding-3-small"}
    async with running(app_of(Settings(), one)) as client:
        open_ = await client.post("/v1/embeddings", json=sdk_default)
    async with running(app_of(Settings(allowed_embedding_models=["a*"]), one)) as client:
        listed = await client.post("/v1/embeddings", json=sdk_default)
        by_name = await client.post("/v1/embeddings", json={"input": ["x"], "model": "a"})
    assert open_.status_code == 200 and open_.json()["model"] == "a"
    assert listed.status_code == 404
    assert "embedding models served: a" in listed.json()["error"]["message"]
    assert by_name.status_code == 200


async def test_the_batch_route_sizes_each_part_by_the_model_it_names(tiny_model_dir: Path) -> None:
    """/v1/embeddings/batch took its bound on inputs and its sub-requests at once (a quarter of
    max_concurrent_requests, at most 16) from the top-level settings, not from the model each
    names: 40 inputs to a model allowing 64 were refused by the top level's 16, and 8
    sub-requests at once to a model of 4 slots got 429s. Each model's own now."""

    def build(s: Settings) -> list[ServedModel]:
        own = ModelConfig(
            name="a", model_id="x", max_concurrent_requests=4, max_client_batch_size=64
        )
        small = ModelConfig(name="b", model_id="x", max_client_batch_size=2)
        return [
            local(tiny_model_dir, s, own, FakeBackend(16, delay=0.02)),
            local(tiny_model_dir, s, small, FakeBackend(8)),
        ]

    app = app_of(Settings(max_client_batch_size=16), build)
    texts = [[f"text {k} {j}" for j in range(5)] for k in range(8)]  # 40 inputs in all
    to_a = {"requests": [{"id": str(k), "input": texts[k], "model": "a"} for k in range(8)]}
    to_b = {"requests": [{"id": str(k), "input": "t", "model": "b"} for k in range(3)]}
    async with running(app) as client:
        answered = await client.post("/v1/embeddings/batch", json=to_a)
        too_many = await client.post("/v1/embeddings/batch", json=to_b)
    assert answered.status_code == 200, answered.text
    results = answered.json()["results"]
    assert [r["id"] for r in results] == [str(k) for k in range(8)]
    assert all("error" not in r for r in results), [r for r in results if "error" in r][:2]
    assert too_many.status_code == 400  # OpenAI's status for too many inputs
    assert (
        "3 inputs across the batch to model 'b' > maximum allowed batch size 2"
        in (too_many.json()["error"]["message"])
    )


def test_pick_follows_models_added_and_removed(tiny_model_dir: Path) -> None:
    s = Settings()
    a = local(tiny_model_dir, s, ModelConfig(name="a", model_id="x"), FakeBackend())
    b = local(tiny_model_dir, s, ModelConfig(name="b", model_id="x"), FakeBackend())
    gw = Gateway([a])
    assert gw.model("any-sdk-default") is a  # the one embedder stands in for any name
    gw.add(b)
    assert gw.model(None) is a and gw.model("b") is b
    with pytest.raises(ModelNotFoundError, match="embedding models served: a, b"):
        gw.model("any-sdk-default")  # two embedders: no stand-in any more
    gw.remove("a")
    assert gw.model(None) is b and gw.model("any-sdk-default") is b
    gw.remove("b")
    with pytest.raises(NotReadyError):
        gw.model(None)


def test_a_model_outside_the_allowed_list_is_never_served(tiny_model_dir: Path) -> None:
    s = Settings()
    allowed = AllowedModels(embedding=("a",))
    gw = Gateway(
        [local(tiny_model_dir, s, ModelConfig(name="a", model_id="x"), FakeBackend())],
        allowed=allowed,
    )
    with pytest.raises(InvalidRequestError, match="outside the allowed embedding models"):
        gw.add(local(tiny_model_dir, s, ModelConfig(name="b", model_id="x"), FakeBackend()))
    assert [m.name for m in gw.models] == ["a"]


def lazy(
    tiny_model_dir: Path,
    loads: list[str],
    *,
    fail: bool = False,
    gate: threading.Event | None = None,
    fail_times: int = 0,
    retry_s: float = 30.0,
    cap: int | None = None,
    wait_s: float = 30.0,
) -> Callable[[Settings], list[ServedModel]]:
    """``cap``: z's ``max_concurrent_requests``; ``wait_s``: the longest a request waits for
    its load (z's queue timeout)."""

    def build(s: Settings) -> list[ServedModel]:
        eager = local(tiny_model_dir, s, ModelConfig(name="a", model_id="x"), FakeBackend(16))
        config = ModelConfig(
            name="z", model_id="org/z", kind="embed", load="lazy", max_concurrent_requests=cap
        )

        def load() -> ServedModel:
            loads.append("z")
            if gate is not None:
                gate.wait(10)
            if fail or len(loads) <= fail_times:
                raise FatalBackendError("org/z: no such model in /srv/models/z")
            return local(tiny_model_dir, s, config, FakeBackend(8))

        info = placeholder(config.resolved(s))
        return [eager, LazyModel(info, load, retry_s=retry_s, wait_s=wait_s)]

    return build


async def test_a_lazy_model_loads_once_on_its_first_requests(tiny_model_dir: Path) -> None:
    loads: list[str] = []
    release = threading.Event()
    settings = Settings(admin_secret="test-admin-secret")
    async with running(app_of(settings, lazy(tiny_model_dir, loads, gate=release))) as client:
        before = (await client.get("/v1/models")).json()["data"]
        ready_before = await client.get("/health/ready")
        assert loads == []  # not loaded at start
        calls = [
            asyncio.ensure_future(
                client.post("/v1/embeddings", json={"input": [f"t{i}"], "model": "z"})
            )
            for i in range(8)
        ]
        await eventually(lambda: bool(loads))  # the first request started the load
        release.set()
        answers = await asyncio.gather(*calls)
        info = (await client.get("/info", params={"model": "z"})).json()
        admin = {"authorization": "Bearer test-admin-secret"}
        status = (await client.get("/api/v1/status", headers=admin)).json()["models"]["z"]
        build = [
            dict(k[1])
            for k in parse_metrics((await client.get("/metrics")).text)
            if k[0] == "embedplex_build_info" and dict(k[1])["model"] == "z"
        ]
    assert [(m["id"], m["kind"]) for m in before] == [("a", "embed"), ("z", "embed")]
    # One build info: the loaded model's, its placeholder's ("onnx", device "auto") gone.
    assert [(b["backend"], b["device"]) for b in build] == [("fake", "cpu")]
    assert ready_before.status_code == 200
    assert loads == ["z"]
    assert [r.status_code for r in answers] == [200] * 8
    assert {len(r.json()["data"][0]["embedding"]) for r in answers} == {8}
    assert info["dimensions"] == 8
    assert status["loaded"] is True and status["batches"] >= 1


async def test_the_callers_waiting_for_a_lazy_load_are_capped_and_bounded(
    tiny_model_dir: Path,
) -> None:
    """200 requests of 1.8 MB once piled onto a loading model, none refused (RSS 161 -> 1,044
    MB), answered up to 100 s later. Its waiters are its requests in flight now: past its
    max_concurrent_requests, 429 at once; each waits at most its queue timeout (503, as the
    queue's timeout answers); the in-flight gauge shows them."""
    loads: list[str] = []
    release = threading.Event()
    build = lazy(tiny_model_dir, loads, gate=release, cap=2, wait_s=1.0)
    body = {"inputs": "x", "model": "z"}

    async def in_flight(client: httpx.AsyncClient) -> float:
        metrics = parse_metrics((await client.get("/metrics")).text)
        return metrics.get(("embedplex_requests_in_flight", (("model", "z"),)), -1.0)

    try:
        async with running(app_of(Settings(), build)) as client:
            waiting = [asyncio.ensure_future(client.post("/embed", json=body)) for _ in range(2)]
            await eventually(lambda: bool(loads))
            await eventually(lambda: _equals(in_flight(client), 2.0))
            started = time.perf_counter()
            refused = await asyncio.wait_for(client.post("/embed", json=body), 5)
            refused_in = time.perf_counter() - started
            timed_out = await asyncio.gather(*waiting)
            after_wait = await in_flight(client)
            release.set()
            await eventually(lambda: _z_loaded(client))
            loaded = await client.post("/embed", json=body)
    finally:
        release.set()
    assert refused.status_code == 429 and refused_in < 0.5, refused.text
    assert refused.headers["retry-after"] == "1"
    assert "2 requests waiting for model 'z' to load" in refused.json()["error"]
    assert [r.status_code for r in timed_out] == [503, 503]
    for r in timed_out:
        assert r.headers["retry-after"] == "1"
        assert "still loading after 1s" in r.json()["error"]
    assert after_wait == 0.0
    assert loaded.status_code == 200 and loads == ["z"]  # the load went on: once


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def _z_loaded(client: httpx.AsyncClient) -> bool:
    r = await client.get("/info", params={"model": "z"})
    return bool(r.json()["dimensions"] == 8)


async def test_a_lazy_model_that_fails_to_load_says_why(tiny_model_dir: Path) -> None:
    loads: list[str] = []
    async with running(app_of(Settings(), lazy(tiny_model_dir, loads, fail=True))) as client:
        first = await client.post("/v1/embeddings", json={"input": ["x"], "model": "z"})
        again = await client.post("/embed", json={"inputs": "x", "model": "z"})
        other = await client.post("/embed", json={"inputs": "x", "model": "a"})
        ready = await client.get("/health/ready")
    assert loads == ["z"]  # not retried per request: only after the backoff
    assert first.status_code == again.status_code == 503
    assert (
        "model 'z' failed to load: org/z: no such model in /srv/models/z"
        in (first.json()["error"]["message"])
    )
    assert "failed to load" in again.json()["error"] and "tried again in" in again.text
    assert other.status_code == 200  # the other models still serve
    # One model's failed load does not take the replica out of rotation, and the public
    # readiness body never shows its reason (it may name a path on disk).
    assert ready.status_code == 200 and "/srv/models" not in ready.text


async def test_a_lazy_model_whose_load_failed_is_tried_again_after_a_backoff(
    tiny_model_dir: Path,
) -> None:
    loads: list[str] = []
    build = lazy(tiny_model_dir, loads, fail_times=2, retry_s=0.3)
    async with running(app_of(Settings(), build)) as client:
        body = {"inputs": "x", "model": "z"}
        first = await client.post("/embed", json=body)  # load 1 fails; backoff 0.3 s
        during = await client.post("/embed", json=body)  # within it: refused, not loaded
        await asyncio.sleep(0.4)
        second = await client.post("/embed", json=body)  # load 2 fails; backoff 0.6 s
        await asyncio.sleep(0.4)
        still = await client.post("/embed", json=body)  # the doubled wait is not over
        await asyncio.sleep(0.4)
        healed = await client.post("/embed", json=body)  # load 3 succeeds
        ready = await client.get("/health/ready")
    assert [r.status_code for r in (first, during, second, still)] == [503] * 4
    assert healed.status_code == 200 and len(healed.json()[0]) == 8
    assert loads == ["z", "z", "z"]
    assert ready.status_code == 200


async def test_a_lazy_model_answers_the_token_routes_as_the_model_it_loads(
    tiny_model_dir: Path,
) -> None:
    """/tokenize, /embed_all and /decode reach a lazy model (the first of them loads it) and
    answer as the same model loaded at start ("a" and "z" share the tiny BERT's files)."""
    loads: list[str] = []
    async with running(app_of(Settings(), lazy(tiny_model_dir, loads))) as client:
        answers = {}
        for name in ("z", "a"):  # the lazy one first: its first request is /embed_all
            embed_all = await client.post(
                "/embed_all", json={"inputs": ["hello world"], "model": name}
            )
            tokens = await client.post("/tokenize", json={"inputs": "hello world", "model": name})
            ids = [t["id"] for t in tokens.json()[0]] if tokens.status_code == 200 else [1]
            answers[name] = [
                embed_all,
                tokens,
                await client.post("/decode", json={"ids": [ids], "model": name}),
                await client.post("/decode", json={"ids": [], "model": name}),
            ]
    assert loads == ["z"]
    lazy_all, lazy_tok, lazy_dec, lazy_empty = answers["z"]
    eager_all, eager_tok, eager_dec, eager_empty = answers["a"]
    assert [r.status_code for r in answers["z"]] == [200, 200, 200, 400]
    assert lazy_tok.json() == eager_tok.json()
    assert lazy_dec.json() == eager_dec.json()
    assert len(lazy_dec.json()) == 1 and "hello" in lazy_dec.json()[0]
    rows, eager_rows = lazy_all.json()[0], eager_all.json()[0]
    assert len(rows) == len(eager_rows) == len(lazy_tok.json()[0])  # one vector per token
    assert {len(v) for v in rows} == {8} and {len(v) for v in eager_rows} == {16}
    assert lazy_empty.json()["error"] == eager_empty.json()["error"]


async def test_a_lazy_model_asked_for_another_kind_is_refused_without_loading(
    tiny_model_dir: Path,
) -> None:
    """The routes pick a model by the kind its config names: a lazy reranker asked to embed
    (or for its tokens) and a lazy embedder asked to rerank get the 422 they get once loaded,
    and are not loaded for it."""
    loads: list[str] = []

    def build(s: Settings) -> list[ServedModel]:
        def lazy_one(config: ModelConfig, backend: FakeBackend) -> LazyModel:
            def load() -> ServedModel:
                loads.append(config.name)
                return local(tiny_model_dir, s, config, backend)

            return LazyModel(placeholder(config.resolved(s)), load)

        reranker = ModelConfig(name="lr", model_id="org/lr", kind="rerank", load="lazy")
        embedder = ModelConfig(name="le", model_id="org/le", kind="embed", load="lazy")
        return [
            lazy_one(reranker, FakeBackend(kind=ModelKind.RERANKER)),
            lazy_one(embedder, FakeBackend(8)),
        ]

    wrong = [
        ("/embed_all", {"inputs": ["hello"], "model": "lr"}),
        ("/embed", {"inputs": "hello", "model": "lr"}),
        ("/v1/embeddings", {"input": "hello", "model": "lr"}),
        ("/tokenize", {"inputs": "hello", "model": "lr"}),
        ("/decode", {"ids": [1, 2], "model": "lr"}),
        ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "model": "lr"}),
        ("/rerank", {"query": "q", "texts": ["t"], "model": "le"}),
        ("/v1/rerank", {"query": "q", "documents": ["t"], "model": "le"}),
    ]
    async with running(app_of(Settings(), build)) as client:
        before = [await client.post(path, json=body) for path, body in wrong]
        assert loads == []  # refused from the configured kind: nothing loaded for it
        rerank = await client.post("/rerank", json={"query": "q", "texts": ["t"], "model": "lr"})
        embed = await client.post("/embed", json={"inputs": "hello", "model": "le"})
        assert (rerank.status_code, embed.status_code, loads) == (200, 200, ["lr", "le"])
        after = [await client.post(path, json=body) for path, body in wrong]
    # 422 in TEI's dialect, 400 in OpenAI's (before[2], /v1/embeddings)
    assert [r.status_code for r in before] == [422, 422, 400, 422, 422, 422, 422, 422]
    assert [r.json() for r in before] == [r.json() for r in after]  # as the loaded models say
    assert before[0].json()["error"] == "model 'lr' is a reranker model, not an embedding model"
    assert before[2].json()["error"]["param"] == "model"
    assert before[-1].json()["error"] == "model 'le' is an embedding model, not a reranker model"


async def test_a_lazy_model_that_loads_but_fails_to_start_is_closed_each_try() -> None:
    """Each retry after a failed start would otherwise leave a loaded model's pools behind."""
    from types import SimpleNamespace

    from embedplex.core.errors import NotReadyError
    from embedplex.gateway.lazy import LazyModel

    made: list[Any] = []
    closed: list[Any] = []

    class Unstartable:
        info = SimpleNamespace(name="z")

        def __init__(self) -> None:
            made.append(self)

        async def start(self) -> None:
            raise RuntimeError("can't start new thread")

        async def close(self, *, drain: bool = True) -> None:
            closed.append(self)

    placeholder = SimpleNamespace(name="z", max_concurrent_requests=None)
    model = LazyModel(placeholder, Unstartable, retry_s=0.01, retry_max_s=0.01)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(NotReadyError, match="failed to load"):
            await model.ready()
        await asyncio.sleep(0.03)
    assert len(made) == 3 and closed == made
