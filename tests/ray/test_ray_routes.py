"""Every route that reaches a local model answers the same for a Ray-served one: one gateway
serves a tiny model twice, in process (``local``) and through a replica (``ray``), and each
route's answer, good or bad, is compared between the two.

The replica is the real ``EmbedplexReplica`` (its own model, batcher and tokenizer), called
through a stand-in for Serve's handle that pickles every call and answer as Ray does, so this
runs without a Ray cluster. The tests marked slow do the same on a real local cluster, and
attach to replicas of an older release.
"""

from __future__ import annotations

import asyncio
import contextvars
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedplex.api.app import create_app
from embedplex.api.pipeline import Pipeline
from embedplex.config import Settings
from embedplex.core.tenant import KeyLimits, Tenant
from embedplex.gateway import Gateway
from embedplex.models import ray_deploy
from embedplex.models.config import ModelConfig
from embedplex.models.loading import load_local_model
from embedplex.models.ray import RayErrors, RayModel
from embedplex.ray.application import REPLICA_SETTINGS
from embedplex.ray.replica import EmbedplexReplica
from helpers import running
from tenants import TenantByHeader
from tiny_models import make_tiny_bert

# No Ray here: no Ray error to map.
ERRORS = RayErrors(overloaded=(), replica_lost=(), other=())


class PickleHandle:
    """A DeploymentHandle over a replica object in this process: each call's arguments and
    answer are pickled and unpickled, as they are between a gateway and a Ray replica, and the
    replica runs in a context of its own, as in its Ray process: nothing the gateway keeps in
    context variables (the request's deadline, its key's ``Spend``) reaches it. ``before``: run
    there first (a test holds the call in flight)."""

    def __init__(
        self, replica: object, before: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._replica = replica
        self._before = before

    def __getattr__(self, method: str) -> Any:
        target = getattr(self._replica, method)
        before = self._before

        async def call(args: tuple[object, ...]) -> object:
            if before is not None:
                await before()
            answer = await target(*pickle.loads(pickle.dumps(args)))
            return pickle.loads(pickle.dumps(answer))

        class Remote:
            @staticmethod
            async def remote(*args: object) -> object:
                # Awaiting the task: a caller that leaves cancels it, as Ray cancels the call.
                return await asyncio.create_task(call(args), context=contextvars.Context())

        return Remote()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("ray-routes") / "tiny", prompts={"q": "query: "})


ADMIN = "ray-routes-admin-secret"


def _settings(tiny: Path, cache: Path, **models: dict[str, Any]) -> Settings:
    tables = [{"name": name, "model_id": str(tiny), **keys} for name, keys in models.items()]
    return Settings.model_validate({"cache_dir": cache, "models": tables, "admin_secret": ADMIN})


@pytest.fixture
def replicas() -> list[EmbedplexReplica]:
    """The replica ``client`` made (to read its own stats)."""
    return []


@pytest.fixture
async def client(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory, replicas: list[EmbedplexReplica]
) -> AsyncIterator[httpx.AsyncClient]:
    """``local`` in process and ``ray`` through a replica, the same files and limits."""
    cache = tmp_path_factory.getbasetemp() / "ray-routes-export"
    limits = {"max_client_batch_size": 4}
    settings = _settings(tiny, cache, local=limits, ray=limits)
    local_table, ray_table = settings.local_models()
    shipped = settings.model_dump(mode="json", include=set(REPLICA_SETTINGS))

    def gateway(s: Settings) -> Gateway:
        local = load_local_model(s, local_table)
        replica = EmbedplexReplica(shipped, ray_table.model_dump(mode="json"))
        replicas.append(replica)
        info = pickle.loads(pickle.dumps(replica._model.info))
        ray = RayModel(ray_table, PickleHandle(replica), info, errors=ERRORS)
        return Gateway([local, ray])

    async with running(create_app(settings, gateway_factory=gateway)) as c:
        yield c


async def both(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """``path`` with ``body`` for the local model and the Ray one; the same status and JSON
    (the Ray one's is returned)."""
    local = await client.post(path, json={**body, "model": "local"})
    ray = await client.post(path, json={**body, "model": "ray"})
    assert ray.status_code == local.status_code, (path, body, local.text, ray.text)
    if path != "/embed_all" or ray.status_code != 200:  # vectors: compared within tolerance
        assert ray.json() == local.json(), (path, body)
    return ray


async def test_tokenize_answers_what_the_local_model_does(client: httpx.AsyncClient) -> None:
    texts = ["Hello world", "the quick brown fox jumps", "unknownword cat"]
    ray = await both(client, "/tokenize", {"inputs": texts})
    assert [t["text"] for t in ray.json()[0]] == ["[CLS]", "Hello", "world", "[SEP]"]
    assert ray.json()[0][1] == {"id": 18, "text": "Hello", "special": False, "start": 0, "stop": 5}
    await both(client, "/tokenize", {"inputs": "a cat", "add_special_tokens": False})
    prompted = await both(client, "/tokenize", {"inputs": "cat", "prompt_name": "q"})
    assert [t["text"] for t in prompted.json()[0]][1:4] == ["query", ":", "cat"]
    # Bad input: the same status and error body.
    assert (
        await both(client, "/tokenize", {"inputs": "cat", "prompt_name": "x"})
    ).status_code == 422
    assert (await both(client, "/tokenize", {"inputs": []})).status_code == 400
    too_many = await both(client, "/tokenize", {"inputs": ["a"] * 5})
    assert too_many.status_code == 422


async def test_embed_all_gives_the_local_models_token_vectors(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"inputs": ["hello world", "query cat", "fox"], "prompt_name": "q"}
    local = await client.post("/embed_all", json={**body, "model": "local"})
    ray = await both(client, "/embed_all", body)
    assert ray.status_code == 200, ray.text
    assert [len(rows) for rows in ray.json()] == [6, 6, 5]  # [CLS] query : ... [SEP]
    for mine, theirs in zip(ray.json(), local.json(), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    ids = await both(client, "/embed_all", {"inputs": [2, 18, 19, 3]})
    assert np.asarray(ids.json()).shape == (1, 4, 32)
    left = await both(
        client,
        "/embed_all",
        {"inputs": " ".join(["cat"] * 40), "truncation_direction": "left"},
    )
    assert np.asarray(left.json()).shape == (1, 32, 32)  # cut to max_input_length
    # Bad input: the same status and error body.
    long_text = {"inputs": " ".join(["cat"] * 40), "truncate": False}
    assert (await both(client, "/embed_all", long_text)).status_code == 422
    assert (await both(client, "/embed_all", {"inputs": ["a"] * 5})).status_code == 422
    assert (await both(client, "/embed_all", {"inputs": []})).status_code == 400
    from embedplex.models import token_level

    monkeypatch.setattr(token_level, "MAX_NUMBERS", 127)  # the replica's bound, in this process
    big = await both(client, "/embed_all", {"inputs": ["hello world", "hello world"]})
    assert big.status_code == 422 and "one /embed_all answer may hold" in big.text


async def test_decode_gives_the_local_models_text(client: httpx.AsyncClient) -> None:
    ray = await both(client, "/decode", {"ids": [[18, 19], [21, 22]]})
    assert ray.json() == ["hello world", "dog fox"]
    await both(client, "/decode", {"ids": [2, 18, 3], "skip_special_tokens": False})
    # Bad input: the same status and error body.
    assert (await both(client, "/decode", {"ids": [[2, 999]]})).status_code == 422
    assert (await both(client, "/decode", {"ids": [[18], []]})).status_code == 400
    assert (await both(client, "/decode", {"ids": []})).status_code == 400
    assert (await both(client, "/decode", {"ids": [[18]] * 5})).status_code == 422


async def test_embed_info_and_similarity_match_too(client: httpx.AsyncClient) -> None:
    """The routes Ray already forwarded: prompts, truncation, dimensions, token inputs."""
    for body in (
        {"inputs": ["hello world", "cat"], "prompt_name": "q", "dimensions": 8},
        {"inputs": " ".join(["fox"] * 50), "truncation_direction": "left", "normalize": False},
        {"inputs": [[2, 18, 3]]},
    ):
        local = await client.post("/embed", json={**body, "model": "local"})
        ray = await client.post("/embed", json={**body, "model": "ray"})
        assert local.status_code == ray.status_code == 200, ray.text
        np.testing.assert_allclose(ray.json(), local.json(), rtol=1e-5, atol=1e-6)
    await both(client, "/embed", {"inputs": "cat", "dimensions": 33})
    await both(client, "/embed", {"inputs": " ".join(["fox"] * 50), "truncate": False})
    local = (await client.get("/info", params={"model": "local"})).json()
    ray = (await client.get("/info", params={"model": "ray"})).json()
    assert {k: v for k, v in ray.items() if k != "served_model_name"} == {
        k: v for k, v in local.items() if k != "served_model_name"
    }
    sims = {
        m: (
            await client.post(
                "/similarity",
                json={
                    "inputs": {"source_sentence": "cat", "sentences": ["dog", "fox"]},
                    "model": m,
                },
            )
        ).json()
        for m in ("local", "ray")
    }
    np.testing.assert_allclose(sims["ray"], sims["local"], rtol=1e-5)


@pytest.mark.slow
async def test_on_a_ray_cluster_every_route_answers_as_the_local_model(
    ray_cluster: str,
    tiny: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway deploys ``ray`` as a real Serve replica (this process is the cluster's
    driver) next to the same files served as ``local``. A key's ``tpm`` holds a burst to it
    as it does to a local model: the replica, in another process, never sees the request's
    ``Spend``, so the gateway reserves before the call (six 200s before it did)."""

    monkeypatch.setattr(ray_deploy, "_connected", [])  # this module's cluster, not another's
    cache = tmp_path_factory.getbasetemp() / "ray-routes-export"
    ray_keys = {"runtime": "ray", "ray_address": "auto", "num_cpus": 1}
    settings = _settings(tiny, cache, local={}, ray=ray_keys)
    app = create_app(settings)
    assert isinstance(app.edge, Pipeline)
    app.edge.stages.insert(2, TenantByHeader({"k": Tenant(key_id="k", limits=KeyLimits(tpm=1000))}))
    async with running(app) as client:
        tokens = await both(client, "/tokenize", {"inputs": ["Hello world", "cat"]})
        assert [t["id"] for t in tokens.json()[1]] == [2, 20, 3]
        assert (await both(client, "/tokenize", {"inputs": "cat", "prompt_name": "x"})).is_error
        body = {"inputs": ["hello world", "fox"], "prompt_name": "q"}
        local = await client.post("/embed_all", json={**body, "model": "local"})
        ray = await both(client, "/embed_all", body)
        for mine, theirs in zip(ray.json(), local.json(), strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
        too_long = {"inputs": " ".join(["cat"] * 40), "truncate": False}
        assert (await both(client, "/embed_all", too_long)).status_code == 422
        assert (await both(client, "/decode", {"ids": [[18, 19]]})).json() == ["hello world"]
        assert (await both(client, "/decode", {"ids": [[2, 999]]})).status_code == 422
        answer = await client.get("/api/v1/status", headers={"x-admin-secret": ADMIN})
        status = answer.json()["models"]["ray"]
        assert status["wire_version"] == 2
        assert sum(status["requests_per_replica"].values()) == 3  # the answers, not the errors
        # 40 texts of more than the model's 32 tokens: 1,280 tokens a request.
        long = "the quick brown fox jumps over a lazy dog " * 6
        burst = await asyncio.gather(
            *(
                client.post(
                    "/v1/embeddings",
                    json={"input": [f"{r} {i}: {long}" for i in range(40)], "model": "ray"},
                    headers={"x-test-tenant": "k"},
                )
                for r in range(6)
            )
        )
        assert sorted(a.status_code for a in burst) == [200] + [429] * 5
        (answered,) = [a for a in burst if a.status_code == 200]
        assert answered.json()["usage"]["prompt_tokens"] == 40 * 32  # the replica's count


@pytest.mark.slow
def test_replicas_of_an_older_release_get_a_clear_error_not_a_hang(
    ray_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An application of the first release (no wire_version, tokenize, embed_all, decode),
    as one deployed by an older gateway or ``serve run``: the gateway attaches, embeds still
    work, and the newer routes get a 422 that says why, without calling the replica. If one
    replica turns out to lack the method anyway (an upgrade in progress), Serve's error for
    it becomes a 503 that says so, after one retry."""
    import asyncio

    from embedplex.core.errors import InvalidRequestError, UnavailableError
    from embedplex.core.types import EmbedRequest, ModelInfo, Timings
    from embedplex.gateway.build import placeholder
    from embedplex.ray.wire import DEPLOYMENT, EmbedAnswer, app_name
    from ray import serve

    monkeypatch.setattr(ray_deploy, "_connected", [])
    config = ModelConfig.model_validate({"name": "old", "model_id": "x", "runtime": "ray"})
    info = placeholder(config)

    class FirstRelease:
        async def info(self) -> ModelInfo:
            return info

        async def embed(self, request: EmbedRequest) -> EmbedAnswer:
            matrix = np.ones((len(request.inputs), 4), np.float32)
            return EmbedAnswer(matrix, 1, Timings(), "first")

        async def check_health(self) -> None:
            return None

    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 0})
    serve.run(deployment(FirstRelease).bind(), name=app_name("old"), route_prefix=None)
    try:
        model = RayModel.deploy(Settings(), config)
        assert not model.owned and model.wire == 1

        async def calls() -> None:
            assert len((await model.embed(EmbedRequest(inputs=["a", "b"]))).vectors) == 2
            for call in (
                model.tokenize(["hello"]),
                model.embed_all(EmbedRequest(inputs=["hello"])),
                model.decode([[18]], skip_special_tokens=True),
            ):
                with pytest.raises(InvalidRequestError, match="wire version 1"):
                    await asyncio.wait_for(call, 30)
            model.wire = 2  # as if the version read had reached a newer replica
            with pytest.raises(UnavailableError, match="older embedplex without tokenize"):
                await asyncio.wait_for(model.tokenize(["hello"]), 30)
            assert model.retries == 1

        asyncio.run(calls())
    finally:
        serve.delete(app_name("old"))


def test_on_a_ray_cluster_a_start_that_cannot_run_fails_and_another_table_is_named(
    ray_cluster: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas the 2-CPU cluster cannot place (num_cpus 8): a blocking serve.run waited
    forever, "loading", nothing logged; now the start fails at ray_start_timeout_s and the
    application is not left pending. A running application deployed with another table: the
    gateway attaches to it and names the keys that differ (it said nothing)."""
    import logging
    import time

    from embedplex.core.errors import FatalBackendError
    from embedplex.core.types import ModelInfo
    from embedplex.gateway.build import placeholder
    from embedplex.ray.wire import DEPLOYMENT, WIRE_VERSION, app_name
    from ray import serve

    monkeypatch.setattr(ray_deploy, "_connected", [])
    table = {"model_id": "x", "runtime": "ray", "ray_start_timeout_s": 3}
    big = ModelConfig.model_validate({"name": "big", "num_cpus": 8, **table})
    started = time.monotonic()
    with pytest.raises(FatalBackendError, match="embedplex-big is not running after 3s"):
        RayModel.deploy(Settings(), big)
    assert time.monotonic() - started < 30
    for _ in range(100):
        if app_name("big") not in serve.status().applications:
            break
        time.sleep(0.1)
    assert app_name("big") not in serve.status().applications

    one = ModelConfig.model_validate({"name": "shared", "replicas": 1, **table})
    info = placeholder(one)

    class Deployed:
        async def info(self) -> ModelInfo:
            return info

        async def wire_version(self) -> int:
            return WIRE_VERSION

        async def check_health(self) -> None:
            return None

    deployment = serve.deployment(
        name=DEPLOYMENT, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512
    )
    serve.run(deployment(Deployed).bind(), name=app_name("shared"), route_prefix=None)
    try:
        two = one.model_copy(update={"replicas": 2, "num_cpus": 0.5})
        with caplog.at_level(logging.INFO, "embedplex.models.ray_deploy"):
            model = RayModel.deploy(Settings(), two)
        assert not model.owned
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert (
            "(num_cpus: running 0, this table 0.5; replicas: running 1, this table 2)"
            in (warnings[0])
        )
    finally:
        serve.delete(app_name("shared"))


@pytest.mark.slow
def test_on_a_ray_cluster_a_stuck_replica_is_cut_and_a_deleted_application_comes_back(
    ray_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that never answers: the caller gets a 504 at its request deadline and the
    replica sees the call cancelled. The gateway that deployed the application leaves it
    running when it closes; one that finds it deleted deploys it again."""
    import asyncio
    import time

    import embedplex.models.ray as ray_module
    import embedplex.ray.application as application_module
    from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
    from embedplex.core.errors import UpstreamTimeoutError
    from embedplex.core.types import EmbedRequest, ModelInfo
    from embedplex.gateway.build import placeholder
    from embedplex.ray.wire import DEPLOYMENT, WIRE_VERSION, app_name
    from ray import serve

    monkeypatch.setattr(ray_deploy, "_connected", [])
    monkeypatch.setattr(ray_module, "REDEPLOY_JITTER_S", 0.0)
    config = ModelConfig.model_validate({"name": "stuck", "model_id": "x", "runtime": "ray"})
    info = placeholder(config)

    class Stuck:
        def __init__(self) -> None:
            self.cancelled = 0

        async def info(self) -> ModelInfo:
            return info

        async def wire_version(self) -> int:
            return WIRE_VERSION

        async def embed(self, request: EmbedRequest) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        async def cancels(self) -> int:
            return self.cancelled

        async def check_health(self) -> None:
            return None

    def stuck(settings: Settings, model: ModelConfig) -> Any:
        deployment = serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 0})
        return deployment(Stuck).bind()

    monkeypatch.setattr(application_module, "application", stuck)  # what deploy() deploys
    name = app_name("stuck")
    try:
        model = RayModel.deploy(Settings(), config)
        assert model.owned

        async def calls() -> None:
            REQUEST_DEADLINE.set(Deadline.after(1.0, "X-Request-Timeout"))
            started = time.monotonic()
            with pytest.raises(UpstreamTimeoutError, match="1s, X-Request-Timeout"):
                await asyncio.wait_for(model.embed(EmbedRequest(inputs=["a"])), 30)
            assert time.monotonic() - started < 5
            for _ in range(100):  # the cancel reaches the replica
                if await model._handle.cancels.remote():
                    break
                await asyncio.sleep(0.1)
            assert await model._handle.cancels.remote() == 1
            await asyncio.to_thread(serve.delete, name)  # as another gateway or an operator
            model.owned = False
            await model._poll_once()  # finds it gone: deploys it again
            assert model.owned
            for _ in range(300):  # deployed without waiting: its replica starts
                if model._states.get("RUNNING"):
                    break
                await asyncio.sleep(0.1)
                await model._poll_once()
            assert model._states == {"RUNNING": 1}
            await model.close()

        asyncio.run(calls())
        assert name in serve.status().applications  # closing left it running
    finally:
        serve.delete(name)


async def test_a_replica_caches_as_an_in_process_server_does(
    client: httpx.AsyncClient, replicas: list[EmbedplexReplica]
) -> None:
    """cache_max_bytes reaches the replica: a repeated input is a hit there; ``cache: false``
    neither reads nor writes it, as for a local model."""
    first = await client.post("/embed", json={"inputs": ["red fox"], "model": "ray"})
    again = await client.post("/embed", json={"inputs": ["red fox"], "model": "ray"})
    fresh = await client.post(
        "/embed", json={"inputs": ["red fox"], "model": "ray", "cache": False}
    )
    assert first.json() == again.json() == fresh.json()
    stats = await replicas[0].stats()
    assert stats["cache"]["enabled"] and stats["cache"]["entries"] == 1
    assert stats["cache"]["models"]["ray"]["hits_memory"] == 1
