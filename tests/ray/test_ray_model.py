"""The gateway side of Ray replicas without a cluster: config rules, the error mapping and the
retry, readiness from the polled states, and the Serve options (a fake handle stands in)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from embedplex.backends.tokenizer import Token
from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
from embedplex.core.errors import (
    EmptyInputError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
    UpstreamTimeoutError,
)
from embedplex.core.tenant import ANONYMOUS, Tenant
from embedplex.core.types import EmbedRequest, ModelInfo, RerankRequest, Timings
from embedplex.models.config import ModelConfig
from embedplex.models.ray import CALL_MARGIN_S, RayErrors, RayModel, call_bound
from embedplex.ray.application import deployment_options, max_ongoing_requests
from embedplex.ray.wire import DecodeAnswer, EmbedAnswer, TokenEmbedAnswer, TokensAnswer

HAS_RAY = importlib.util.find_spec("ray") is not None


class Lost(Exception):
    """Stands in for Ray's RayActorError (a replica died with the request)."""


class Full(Exception):
    """Stands in for Serve's BackPressureError."""


class Broken(Exception):
    """Stands in for any other Ray error."""

    def __init__(self, message: str = "", cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class NoMethod(Exception):
    """Stands in for Serve's RayServeException, raised for a method the replica lacks."""


ERRORS = RayErrors(overloaded=(Full,), replica_lost=(Lost,), other=(Broken,), no_method=NoMethod)


class Method:
    def __init__(self, answers: list[Callable[[], Any]]) -> None:
        self.answers = answers
        self.calls = 0

    async def _answer(self) -> Any:
        answer = self.answers[self.calls]
        self.calls += 1
        return answer()

    def remote(self, *args: object) -> Any:
        return self._answer()


class FakeHandle:
    """A DeploymentHandle whose methods are the ``Method``s given by name (no other)."""

    def __init__(self, embed: Method | None = None, **methods: Method) -> None:
        if embed is not None:
            methods["embed"] = embed
        for name, method in methods.items():
            setattr(self, name, method)


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
    for _ in range(4):
        m._slots.take(ANONYMOUS)
    with pytest.raises(OverloadedError) as refused:
        m.admit()
    assert refused.value.retry_after == 1  # docs/api.md: Retry-After: 1


async def test_a_key_past_its_fair_share_of_the_replicas_is_refused() -> None:
    """The same admission as a local model's (``batching/admission.py``): 6 of 8 in flight for
    one key, and a second key asking, the first is refused and the second served."""
    m, method = model(ok("r"), max_concurrent_requests=4, replicas=2)
    bulk, search = Tenant(key_id="bulk"), Tenant(key_id="search")
    for _ in range(6):
        m._slots.take(bulk)  # requests of bulk's in flight
    m.admit(search)  # search asks: it shares the replicas now
    with pytest.raises(OverloadedError, match="fair share") as refused:
        await m.embed(EmbedRequest(inputs=["hello"], tenant=bulk))
    assert refused.value.retry_after == 1 and method.calls == 0
    result = await m.embed(EmbedRequest(inputs=["hello"], tenant=search))
    assert result.prompt_tokens == 3 and m.stats()["active_requests"] == 6


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
    # A gateway-only key is not shipped: a replica of an older release refused the table.
    assert "ray_delete_on_close" not in deployment.init_args[1]
    with pytest.raises(ValueError, match="no \\[\\[models\\]\\] table named"):
        embedplex.ray.app({"config": str(example), "model": "nope"})


TOKENS = [
    [
        Token(id=2, text="[CLS]", special=True, start=None, stop=None),
        Token(id=17, text="hello", special=False, start=0, stop=5),
        Token(id=3, text="[SEP]", special=True, start=None, stop=None),
    ],
    [Token(id=19, text="cat", special=False, start=0, stop=3)],
]


def newer(*answers: Callable[[], Any], method: str, **keys: Any) -> tuple[RayModel, Method]:
    """A model whose handle has only ``method`` (answering ``answers`` in turn)."""
    m = Method(list(answers))
    handle = FakeHandle(**{method: m})
    return RayModel(ray_config(**keys), handle, INFO, errors=ERRORS), m


async def test_tokenize_embed_all_and_decode_cross_as_flat_arrays() -> None:
    """What a replica packs (``wire.py``) comes back as the local model's own types."""
    m, _ = newer(lambda: TokensAnswer.pack(TOKENS, "r1"), method="tokenize")
    assert await m.tokenize(["hello", "cat"]) == TOKENS
    shapes = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((1, 4), np.float32)]
    answer = TokenEmbedAnswer.pack(shapes, 4, Timings(inference=2.0), "r2")
    assert answer.matrix.shape == (4, 4) and answer.lengths.tolist() == [3, 1]
    m, _ = newer(lambda: answer, method="embed_all")
    result = await m.embed_all(EmbedRequest(inputs=["hello", "cat"], normalize=False))
    assert [v.tolist() for v in result.vectors] == [v.tolist() for v in shapes]
    assert result.prompt_tokens == 4 and result.timings.inference == 2.0
    assert m.stats()["requests_per_replica"] == {"r2": 1}
    m, _ = newer(lambda: DecodeAnswer(["hello", "cat"], "r3"), method="decode")
    assert await m.decode([[17], [19]], skip_special_tokens=True) == ["hello", "cat"]


def _fill(m: RayModel) -> None:
    """Every slot of ``m``'s cap taken."""
    while m._slots.total < m._slots.cap:
        m._slots.take(ANONYMOUS)


async def test_tokenize_and_decode_skip_the_cap_embed_all_does_not() -> None:
    """As for a local model: only work that queues for inference counts against the cap."""
    m, _ = newer(lambda: TokensAnswer.pack(TOKENS, "r"), method="tokenize", replicas=1)
    _fill(m)
    assert await m.tokenize(["hello", "cat"]) == TOKENS
    m, call = newer(method="embed_all", replicas=1)
    _fill(m)
    with pytest.raises(OverloadedError):
        await m.embed_all(EmbedRequest(inputs=["hello"]))
    assert call.calls == 0


async def test_replicas_too_old_for_an_operation_are_refused_without_a_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replicas of the first release (wire version 1) have no tokenize: a clear 422 at once,
    not a call that fails in Ray; once the application is upgraded, the next check sees it."""
    import embedplex.models.ray as ray_module

    tokenize = Method([lambda: TokensAnswer.pack(TOKENS, "r")])
    handle = FakeHandle(tokenize=tokenize)  # no wire_version: as old replicas
    m = RayModel(ray_config(), handle, INFO, errors=ERRORS, wire=1)
    for call in (
        m.tokenize(["hello"]),
        m.embed_all(EmbedRequest(inputs=["hello"])),
        m.decode([[17]], skip_special_tokens=True),
    ):
        with pytest.raises(InvalidRequestError, match="older embedplex \\(wire version 1\\)"):
            await call
    assert tokenize.calls == 0
    monkeypatch.setattr(ray_module, "VERSION_RECHECK_S", 0.0)
    with pytest.raises(InvalidRequestError, match="redeploy the Serve application embedplex-m"):
        await m.tokenize(["hello"])  # asked again: still no wire_version
    handle.wire_version = Method([lambda: 2])  # type: ignore[attr-defined]
    assert await m.tokenize(["hello"]) == TOKENS
    assert m.wire == 2 and m.stats()["wire_version"] == 2


async def test_one_old_replica_of_an_upgrade_is_retried_then_a_503() -> None:
    def lacks() -> Any:
        raise Broken("task error", NoMethod("Tried to call a method 'decode' that does not exist"))

    m, call = newer(lacks, lambda: DecodeAnswer(["hello"], "new"), method="decode")
    assert await m.decode([[17]], skip_special_tokens=True) == ["hello"]
    assert call.calls == 2 and m.retries == 1
    m, call = newer(lacks, lacks, method="decode")
    with pytest.raises(UnavailableError, match="older embedplex without decode"):
        await m.decode([[17]], skip_special_tokens=True)
    assert call.calls == 2 and m.failures == 1
    # Any other error of a replica is not taken for a missing method: 503 at once.
    m, call = newer(fail(Broken("boom", NoMethod("something else"))), method="decode")
    with pytest.raises(UnavailableError, match="could not serve"):
        await m.decode([[17]], skip_special_tokens=True)
    assert call.calls == 1


class Stuck:
    """A Serve ``DeploymentResponse`` from a replica that never answers (stopped, hung): it
    can only be cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    def __await__(self) -> Any:
        return asyncio.get_running_loop().create_future().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class StuckMethod:
    def __init__(self) -> None:
        self.responses: list[Stuck] = []
        self.called = asyncio.Event()

    def remote(self, *args: object) -> Stuck:
        self.responses.append(Stuck())
        self.called.set()
        return self.responses[-1]


def stuck_model(**keys: Any) -> tuple[RayModel, StuckMethod]:
    method = StuckMethod()
    handle = FakeHandle(**dict.fromkeys(("embed", "rerank", "embed_all"), method))
    return RayModel(ray_config(**keys), handle, INFO, errors=ERRORS), method


async def test_a_stuck_replica_is_cut_at_the_request_deadline_and_the_call_cancelled() -> None:
    """A replica that never answers held its caller until Serve replaced it (~107 s, whatever
    X-Request-Timeout said): now the request's deadline ends the wait, with the 504 a remote
    model gives, and the Ray call is cancelled."""
    m, method = stuck_model()
    token = REQUEST_DEADLINE.set(Deadline.after(0.2, "X-Request-Timeout"))
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeoutError) as info:
            await asyncio.wait_for(m.rerank(RerankRequest(query="q", texts=["a", "b"])), 5)
        took = time.monotonic() - started
    finally:
        REQUEST_DEADLINE.reset(token)
    assert 0.15 < took < 2, took
    assert "the request deadline (0.2s, X-Request-Timeout)" in info.value.message
    assert [r.cancelled for r in method.responses] == [True]
    assert m.stats()["active_requests"] == 0 and m.failures == 0  # the caller's choice


async def test_without_a_deadline_a_stuck_replica_is_cut_at_the_models_bound() -> None:
    """What a local model's request may take (queue timeout, then the watchdog), and a
    margin: then 503, as a local model's queue timeout, counted as a replica failure."""
    config = ray_config(queue_timeout_ms=2000)
    assert call_bound(config, 60.0) == 2 + 60 + CALL_MARGIN_S
    assert call_bound(config, 0.0) is None  # no watchdog: a local pass is unbounded too
    m, method = stuck_model()
    m.bound_s = 0.2
    with pytest.raises(UnavailableError, match=r"no answer from its Ray replica within 0\.2s"):
        await asyncio.wait_for(m.embed(REQUEST), 5)
    assert [r.cancelled for r in method.responses] == [True] and m.failures == 1


async def test_a_caller_that_leaves_cancels_its_ray_call() -> None:
    m, method = stuck_model()
    task = asyncio.ensure_future(m.embed(REQUEST))
    await asyncio.wait_for(method.called.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert method.responses[0].cancelled


async def test_the_models_own_checks_run_in_the_gateway_before_any_replica() -> None:
    """Empty input, max_client_batch_size, dimensions and prompt_name: refused as the local
    model refuses them, without a call (a stuck replica hung even these)."""
    info = dataclasses.replace(INFO, max_client_batch_size=8, prompts={"q": "query: "})
    method = StuckMethod()
    names = ("embed", "rerank", "embed_all", "tokenize", "decode")
    m = RayModel(ray_config(), FakeHandle(**dict.fromkeys(names, method)), info, errors=ERRORS)

    def rerank(texts: list[str]) -> Any:
        return m.rerank(RerankRequest(query="q", texts=texts))

    def embed(n: int = 1, **keys: Any) -> Any:
        return m.embed(EmbedRequest(inputs=["t"] * n, **keys))

    refusals: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (lambda: rerank(["t"] * 9), PayloadTooLargeError, "batch size 9 > maximum allowed"),
        (lambda: rerank([]), EmptyInputError, "texts cannot be empty"),
        (lambda: embed(9), PayloadTooLargeError, "maximum allowed batch size 8"),
        (lambda: embed(0), EmptyInputError, "input cannot be empty"),
        (lambda: embed(dimensions=5), InvalidRequestError, "between 1 and 4"),
        (lambda: embed(prompt_name="x"), InvalidRequestError, "has: q"),
        (lambda: m.embed_all(EmbedRequest(inputs=["t"] * 9)), PayloadTooLargeError, "size 9"),
        (lambda: m.tokenize([]), EmptyInputError, "inputs cannot be empty"),
        (lambda: m.tokenize(["t"], prompt_name="x"), InvalidRequestError, "unknown prompt"),
        (lambda: m.decode([], skip_special_tokens=True), EmptyInputError, "ids cannot be"),
    ]
    for call, error, message in refusals:
        with pytest.raises(error, match=message):
            await asyncio.wait_for(call(), 2)
    assert method.responses == []


async def test_closing_leaves_the_application_to_the_gateways_that_share_it() -> None:
    """A gateway that deployed the application no longer deletes it when it stops (the others
    attached to it answered 503 until one redeployed); ``ray_delete_on_close`` asks for it."""
    deleted: list[str] = []
    for keys, expected in (({}, []), ({"ray_delete_on_close": True}, ["m"])):
        deleted.clear()
        m = RayModel(
            ray_config(**keys),
            FakeHandle(),
            INFO,
            errors=ERRORS,
            owned=True,
            delete=lambda: deleted.append("m"),
        )
        await m.close()
        assert deleted == expected


async def test_an_application_found_gone_is_deployed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway attached to an application that another deleted redeploys it (or attaches
    to it, if another gateway was first), and answers through the new handle."""
    import embedplex.models.ray as ray_module

    monkeypatch.setattr(ray_module, "REDEPLOY_JITTER_S", 0.0)
    states: list[dict[str, int] | None] = [{"RUNNING": 1}]
    fresh = FakeHandle(Method([ok("new")]))
    recovered: list[bool] = []

    def recover() -> tuple[Any, bool]:
        recovered.append(True)
        states[0] = {"STARTING": 1}
        return fresh, True

    m = RayModel(
        ray_config(),
        FakeHandle(Method([])),
        INFO,
        errors=ERRORS,
        read_states=lambda: states[0],
        recover=recover,
    )
    await m._poll_once()
    assert recovered == [] and not m.owned
    states[0] = None  # deleted
    await m._poll_once()
    assert recovered == [True] and m.owned
    with pytest.raises(NotReadyError):
        m.health()
    states[0] = {"RUNNING": 1}
    await m._poll_once()
    m.health()
    assert (await m.embed(REQUEST)).model == "m"
    assert m.stats()["requests_per_replica"] == {"new": 1}
