"""The gateway side of Ray replicas without a cluster: config rules, the error mapping and the
retry, readiness from the polled states, and the Serve options (a fake handle stands in)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from embedplex.core.errors import (
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    UnavailableError,
)
from embedplex.core.types import EmbedRequest, ModelInfo, Timings
from embedplex.models.config import ModelConfig
from embedplex.models.ray import RayErrors, RayModel
from embedplex.ray.application import deployment_options, max_ongoing_requests
from embedplex.ray.wire import EmbedAnswer

HAS_RAY = importlib.util.find_spec("ray") is not None


class Lost(Exception):
    """Stands in for Ray's RayActorError (a replica died with the request)."""


class Full(Exception):
    """Stands in for Serve's BackPressureError."""


class Broken(Exception):
    """Stands in for any other Ray error."""


ERRORS = RayErrors(overloaded=(Full,), replica_lost=(Lost,), other=(Broken,))


class Method:
    def __init__(self, answers: list[Callable[[], Any]]) -> None:
        self.answers = answers
        self.calls = 0

    async def _answer(self) -> Any:
        answer = self.answers[self.calls]
        self.calls += 1
        return answer()

    def remote(self, request: object) -> Any:
        return self._answer()


class FakeHandle:
    def __init__(self, embed: Method) -> None:
        self.embed = embed


def ok(replica: str) -> Callable[[], EmbedAnswer]:
    return lambda: EmbedAnswer(np.ones((1, 4), np.float32), 3, Timings(), replica)


def fail(exc: BaseException) -> Callable[[], Any]:
    def raise_it() -> Any:
        raise exc

    return raise_it


INFO = ModelInfo(
    name="m",
    model_id="x",
    sha=None,
    backend="onnx",
    device="cpu",
    dtype="float32",
    dim=4,
    pooling="mean",
    max_input_length=128,
    prompts={},
    max_batch_requests=32,
)


def ray_config(**keys: Any) -> ModelConfig:
    if not HAS_RAY:
        pytest.skip("ray is not installed")
    return ModelConfig.model_validate({"name": "m", "model_id": "x", "runtime": "ray", **keys})


def model(*answers: Callable[[], Any], **keys: Any) -> tuple[RayModel, Method]:
    method = Method(list(answers))
    return RayModel(ray_config(**keys), FakeHandle(method), INFO, errors=ERRORS), method


REQUEST = EmbedRequest(inputs=["hello"])


async def test_a_lost_replica_is_retried_once() -> None:
    m, method = model(fail(Lost()), ok("b"))
    result = await m.embed(REQUEST)
    assert method.calls == 2 and m.retries == 1 and m.failures == 0
    assert result.vectors[0].dtype == np.float32 and result.prompt_tokens == 3
    assert m.stats()["requests_per_replica"] == {"b": 1}


async def test_a_second_loss_is_a_503_that_says_why() -> None:
    m, method = model(fail(Lost("secret detail")), fail(Lost("secret detail")))
    with pytest.raises(UnavailableError) as info:
        await m.embed(REQUEST)
    assert method.calls == 2 and m.failures == 1
    assert "Ray replica failed" in info.value.message
    assert "secret detail" not in info.value.message


async def test_backpressure_is_429_and_other_ray_errors_503_without_retry() -> None:
    m, method = model(fail(Full()))
    with pytest.raises(OverloadedError):
        await m.embed(REQUEST)
    m, method = model(fail(Broken("traceback text")))
    with pytest.raises(UnavailableError) as info:
        await m.embed(REQUEST)
    assert method.calls == 1 and "traceback text" not in info.value.message


async def test_an_error_the_replica_returns_reaches_the_caller_as_itself() -> None:
    m, method = model(lambda: InvalidRequestError("dimensions too large", param="dimensions"))
    with pytest.raises(InvalidRequestError) as info:
        await m.embed(REQUEST)
    assert info.value.param == "dimensions" and method.calls == 1 and m.retries == 0


async def test_readiness_follows_the_polled_replica_states() -> None:
    states: list[dict[str, int]] = [{"STARTING": 2}]
    method = Method([])
    m = RayModel(
        ray_config(replicas=2),
        FakeHandle(method),
        INFO,
        errors=ERRORS,
        read_states=lambda: states[0],
    )
    await m.start()
    try:
        with pytest.raises(NotReadyError, match="no Ray replica is running"):
            m.health()
        states[0] = {"RUNNING": 1, "STARTING": 1}
        await m._poll_once()
        m.health()
        assert m.stats()["replicas"] == {"RUNNING": 1, "STARTING": 1}
    finally:
        await m.close()


def test_admission_caps_requests_at_the_replicas_capacity() -> None:
    m, _ = model(max_concurrent_requests=2, replicas=2)
    m._active = 4
    with pytest.raises(OverloadedError):
        m.admit()


def test_serve_lets_a_replica_fill_its_batches() -> None:
    """Serve's max_ongoing_requests must not cap a batch (ray-project/ray#43288)."""
    config = ray_config(max_concurrent_requests=16, max_batch_requests=64, num_cpus=2)
    assert max_ongoing_requests(config) >= 2 * 64
    options = deployment_options(config)
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    assert options["num_replicas"] == 1
    scaled = deployment_options(
        ray_config(autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8})
    )
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["max_replicas"] == 3


def test_ray_keys_need_runtime_ray() -> None:
    with pytest.raises(ValidationError, match='only apply with runtime = "ray"'):
        ModelConfig.model_validate({"model_id": "x", "replicas": 2})


def test_replicas_or_autoscaling_not_both_and_min_below_max() -> None:
    with pytest.raises(ValidationError, match="not both"):
        ray_config(replicas=2, autoscaling={"max_replicas": 3})
    with pytest.raises(ValidationError, match="min_replicas exceeds max_replicas"):
        ray_config(autoscaling={"min_replicas": 4, "max_replicas": 3})


def test_runtime_ray_without_ray_installed_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(ValidationError, match=r"pip install 'embedplex\[ray\]'"):
        ModelConfig.model_validate({"model_id": "x", "runtime": "ray"})


def test_embedplex_status_shows_the_replicas() -> None:
    import io

    from rich.console import Console

    from embedplex.cli.status import render_status

    m, _ = model(ok("r1"), ok("r2"))
    m._per_replica.update({"r1": 3, "r2": 5})
    m._states = {"RUNNING": 2, "STARTING": 1}
    payload = {"ready": True, "models": {"m": m.stats()}}
    out = io.StringIO()
    render_status(payload, Console(file=out, width=200))
    text = out.getvalue()
    assert "Ray Serve replicas" in text
    assert "running 2, starting 1" in text and "r1 3, r2 5" in text


def test_the_serve_run_builder_deploys_the_example_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve run embedplex.ray:app config=examples/ray.toml model=minilm`` builds the same
    deployment the gateway deploys (not deployed here: no cluster)."""
    pytest.importorskip("ray")
    from pathlib import Path

    import embedplex.ray

    example = Path(__file__).parent.parent.parent / "examples" / "ray.toml"
    application = embedplex.ray.app({"config": str(example), "model": "minilm"})
    deployment = application._bound_deployment
    assert deployment.name == "EmbedplexReplica"
    assert deployment.num_replicas == 2
    assert (deployment.ray_actor_options or {}).get("num_cpus") == 1
    from embedplex.ray.application import REPLICA_SETTINGS

    assert not {"api_key", "admin_secret", "api_keys", "state_url"} & set(REPLICA_SETTINGS)
    with pytest.raises(ValueError, match="no \\[\\[models\\]\\] table named"):
        embedplex.ray.app({"config": str(example), "model": "nope"})
