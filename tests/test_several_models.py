"""Several local models in one process, served for real: examples/models.toml and a reranker
beside two embedders (tiny random models)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedplex.api.app import create_app
from embedplex.config import Settings
from helpers import free_port, running, wait_ready
from reference import TEXTS, min_cosine
from test_process import start_server
from tiny_models import make_tiny_bert, make_tiny_reranker

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).parent.parent / "examples" / "models.toml"


@pytest.fixture(scope="module")
def example_server(model_cache: Path) -> Iterator[str]:
    port = free_port()
    proc = start_server(port, model_cache, "--config", str(EXAMPLE))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, timeout=600)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.model
def test_the_example_serves_minilm_in_float32_and_int8(
    example_server: str, reference: np.ndarray
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=example_server + "/v1", api_key="unused", max_retries=0)
    short = TEXTS[:13]
    got: dict[str, list[np.ndarray]] = {}
    for name in ("minilm", "minilm-int8"):
        sdk = client.embeddings.create(input=short, model=name)
        assert sdk.model == name
        tei = httpx.post(
            example_server + "/embed",
            json={"inputs": TEXTS, "truncate": True, "model": name},
            timeout=120,
        )
        assert tei.status_code == 200, tei.text
        native = httpx.post(
            example_server + "/api/embed", json={"input": short, "model": name}, timeout=120
        )
        assert native.status_code == 200, native.text
        assert native.json()["model"] == name
        got[name] = [
            np.array([d.embedding for d in sdk.data]),
            np.array(tei.json()),
            np.array(native.json()["embeddings"]),
        ]
    fp32_sdk, fp32_tei, fp32_native = got["minilm"]
    int8_sdk, int8_tei, int8_native = got["minilm-int8"]
    assert min_cosine(fp32_native, reference[:13]) >= 0.99999
    # The export's gate holds 0.97 over its calibration texts; on these 13 other texts
    # onnxruntime 1.32's per-channel QInt8 gives 0.966 (earlier releases: >= 0.97).
    assert min_cosine(int8_native, fp32_native) >= 0.96
    embedders = httpx.get(example_server + "/api/embedders").json()
    assert sorted(e["id"] for e in embedders) == ["minilm", "minilm-int8"]
    assert min_cosine(fp32_sdk, reference[:13]) >= 0.99999
    assert min_cosine(fp32_tei, reference) >= 0.99999
    assert min_cosine(int8_sdk, fp32_sdk) >= 0.96  # as above, through the other dialects
    assert min_cosine(int8_tei, fp32_tei) >= 0.96
    assert min_cosine(int8_tei, fp32_tei) < 0.99999  # really the quantized model
    models = httpx.get(example_server + "/v1/models").json()["data"]
    assert [(m["id"], m["kind"]) for m in models] == [("minilm", "embed"), ("minilm-int8", "embed")]
    info = httpx.get(example_server + "/info", params={"model": "minilm-int8"}).json()
    assert (info["served_model_name"], info["model_dtype"]) == ("minilm-int8", "int8")
    unknown = httpx.post(
        example_server + "/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"}
    )
    assert unknown.status_code == 404  # two embedders: the name must match
    assert "minilm, minilm-int8" in unknown.json()["error"]["message"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("several")
    return {
        "mean": make_tiny_bert(root / "mean", pooling="mean", seed=21),
        "cls": make_tiny_bert(root / "cls", pooling="cls", seed=22),
        "ce": make_tiny_reranker(root / "ce", seed=23),
    }


def several(dirs: dict[str, Path], cache: Path, **top: object) -> Settings:
    return Settings(
        cache_dir=cache,
        models=[
            {"name": "emb-mean", "model_id": str(dirs["mean"])},
            {"name": "emb-cls", "model_id": str(dirs["cls"]), "backend": "torch"},
            {"name": "ce", "model_id": str(dirs["ce"])},  # kind read from its files
            {"name": "ce-lazy", "model_id": str(dirs["ce"]), "kind": "rerank", "load": "lazy"},
        ],
        **top,  # type: ignore[arg-type]
    )


async def test_a_reranker_beside_two_embedders(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    texts = ["hello world", "the quick brown fox"]
    pairs = {"query": "quick fox", "texts": ["the quick brown fox", "a lazy dog"]}
    async with running(create_app(several(tiny_dirs, tmp_path / "c"))) as client:
        mean = await client.post("/v1/embeddings", json={"input": texts, "model": "emb-mean"})
        cls_ = await client.post("/embed", json={"inputs": texts, "model": "emb-cls"})
        ce = await client.post("/rerank", json={**pairs, "model": "ce"})
        lazy = await client.post("/rerank", json={**pairs, "model": "ce-lazy"})
        wrong_kind = await client.post("/embed", json={"inputs": "x", "model": "ce"})
        unknown = await client.post("/rerank", json={**pairs, "model": "nope"})
        kinds = (await client.get("/v1/models")).json()["data"]
    assert mean.status_code == cls_.status_code == ce.status_code == lazy.status_code == 200
    st_mean = SentenceTransformer(str(tiny_dirs["mean"]), device="cpu").encode(texts)
    st_cls = SentenceTransformer(str(tiny_dirs["cls"]), device="cpu").encode(texts)
    assert min_cosine(np.array([d["embedding"] for d in mean.json()["data"]]), st_mean) >= 0.99999
    assert min_cosine(np.array(cls_.json()), st_cls) >= 0.99999
    expected = CrossEncoder(str(tiny_dirs["ce"]), device="cpu").predict(
        [(pairs["query"], t) for t in pairs["texts"]]  # sigmoid scores, as served by default
    )
    for answer in (ce, lazy):
        by_index = {x["index"]: x["score"] for x in answer.json()}
        assert np.allclose([by_index[0], by_index[1]], expected, atol=1e-5)
    assert wrong_kind.status_code == 422
    assert "'ce' is a reranker model, not an embedding model" in wrong_kind.json()["error"]
    assert unknown.status_code == 404
    assert "reranker models served: ce, ce-lazy" in unknown.json()["error"]
    assert [(m["id"], m["kind"]) for m in kinds] == [
        ("emb-mean", "embed"),
        ("emb-cls", "embed"),
        ("ce", "rerank"),
        ("ce-lazy", "rerank"),
    ]


async def test_allowed_lists_decide_what_is_loaded_and_served(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    settings = several(
        tiny_dirs, tmp_path / "c", allowed_embedding_models=["*-mean"], allowed_rerank_models=[]
    )
    app = create_app(settings)
    async with running(app) as client:
        names = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        cls_ = await client.post("/embed", json={"inputs": "x", "model": "emb-cls"})
        ce = await client.post("/rerank", json={"query": "q", "texts": ["t"], "model": "ce"})
        sdk_default = await client.post(
            "/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"}
        )
    assert names == ["emb-mean"]
    assert [m.name for m in app.state.gateway.models] == ["emb-mean"]  # the rest never loaded
    assert cls_.status_code == 404 and "served: emb-mean" in cls_.json()["error"]
    assert ce.status_code == 404 and "no reranker model is served here" in ce.json()["error"]
    assert sdk_default.status_code == 404  # a list is set: no stand-in for other names


async def test_a_table_whose_files_are_another_kind_fails_clearly(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    settings = Settings(
        cache_dir=tmp_path,
        models=[{"name": "x", "model_id": str(tiny_dirs["ce"]), "kind": "embed"}],  # type: ignore[list-item]
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        with pytest.raises(Exception, match=r"kind = 'embed', but .* is a rerank model"):
            await app.state.loader


async def test_local_and_remote_rerankers_beside_two_embedders(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """One namespace: a local cross-encoder and a rerank route to a fake provider (Jina-style
    /v1/rerank) are picked by name on the same routes as the two local embedders."""
    from sentence_transformers import CrossEncoder

    from embedplex.providers.config import RouteConfig
    from upstream_fakes import provider, running_upstream, score_for

    docs = ["the quick brown fox", "a lazy dog", "stock prices"]
    with running_upstream() as fake:
        settings = Settings(
            cache_dir=tmp_path / "c",
            models=[
                {"name": "emb-mean", "model_id": str(tiny_dirs["mean"])},
                {"name": "emb-cls", "model_id": str(tiny_dirs["cls"])},
                {"name": "ce", "model_id": str(tiny_dirs["ce"])},
            ],  # type: ignore[list-item]
            providers=[provider("jina", fake, "openai", rerank_model="jina-reranker")],
            routes=[RouteConfig(model="remote-ce", providers=["jina"], kind="rerank")],
        )
        async with running(create_app(settings)) as client:
            local = await client.post(
                "/v1/rerank", json={"query": "fox", "documents": docs, "model": "ce"}
            )
            remote = await client.post(
                "/v1/rerank", json={"query": "fox", "documents": docs, "model": "remote-ce"}
            )
            tei_remote = await client.post(
                "/rerank", json={"query": "fox", "texts": docs, "model": "remote-ce"}
            )
            emb = await client.post("/embed", json={"inputs": "x", "model": "emb-cls"})
            listed = (await client.get("/v1/models")).json()["data"]
        assert fake.calls, "the remote reranker was never called"
    assert (
        local.status_code == remote.status_code == tei_remote.status_code == emb.status_code == 200
    )
    expected = CrossEncoder(str(tiny_dirs["ce"]), device="cpu").predict([("fox", d) for d in docs])
    got_local = {r["index"]: r["relevance_score"] for r in local.json()["results"]}
    assert np.allclose([got_local[i] for i in range(3)], expected, atol=1e-5)
    got_remote = {r["index"]: r["relevance_score"] for r in remote.json()["results"]}
    assert got_remote == pytest.approx({i: score_for("fox", d) for i, d in enumerate(docs)})
    assert remote.headers["x-embedplex-provider"] == "jina"
    assert {x["index"]: x["score"] for x in tei_remote.json()} == pytest.approx(got_remote)
    assert [(m["id"], m["kind"]) for m in listed] == [
        ("emb-mean", "embed"),
        ("emb-cls", "embed"),
        ("ce", "rerank"),
        ("remote-ce", "rerank"),
    ]
