"""What the gateway does when its Ray cluster or its settings fail it, without a cluster: a
status read that never returns (the cluster is gone), an address nobody answers, replicas that
cannot be placed, a running application deployed with another table, a model scaled to zero,
and the metrics of replicas that come and go (a fake handle and fake status readers)."""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from test_ray_model import ERRORS, INFO, FakeHandle, Lost, Method, fail, ok, ray_config

from embedplex.api.errors import error_response
from embedplex.core.errors import FatalBackendError, NotReadyError, UnavailableError
from embedplex.core.types import EmbedRequest
from embedplex.models import ray as ray_module
from embedplex.models import ray_deploy
from embedplex.models.ray import RayModel
from embedplex.observability.metrics import Metrics
from embedplex.observability.telemetry import Telemetry

REQUEST = EmbedRequest(inputs=["hello"])


async def test_a_status_read_that_never_returns_makes_the_model_unready_and_calls_503_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After ``ray stop``, serve.status() blocks: the gateway stayed ready with the last states
    and every call waited out its deadline. Now the read is bounded, one at a time."""
    monkeypatch.setattr(ray_module, "STATUS_TIMEOUT_S", 0.2)
    released = threading.Event()
    reads: list[float] = []

    def read_states() -> dict[str, int]:
        reads.append(time.monotonic())
        released.wait(30)
        return {"RUNNING": 1}

    embed = Method([ok("r")])
    m = RayModel(ray_config(), FakeHandle(embed), INFO, errors=ERRORS, read_states=read_states)
    await asyncio.wait_for(m._poll_once(), 3)
    with pytest.raises(NotReadyError, match=r"cannot read Ray Serve's status.*within 0\.2s"):
        m.health()
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="cannot be reached") as info:
        await m.embed(REQUEST)
    assert time.monotonic() - started < 0.1 and embed.calls == 0
    assert info.value.retry_after == ray_module.STATUS_INTERVAL_S
    response = error_response(info.value, "/v1/embeddings")
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    await asyncio.wait_for(m._poll_once(), 3)  # still blocked: not read a second time
    assert len(reads) == 1
    released.set()
    await asyncio.wait_for(m._poll_once(), 3)  # the same read returns: ready again
    m.health()
    assert (await m.embed(REQUEST)).model == "m" and len(reads) == 1


async def test_a_failed_status_read_shows_probes_and_clients_its_type_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/health/ready is unauthenticated: a Ray error's text (its cluster's addresses, session
    paths) goes to the log, not to the probe or a client's 503."""
    secret = "GCS RPC failed: ipv4:10.20.30.40:6379 (session /tmp/ray/session_x)"

    def read_states() -> dict[str, int]:
        raise ConnectionError(secret)

    m = RayModel(
        ray_config(), FakeHandle(Method([ok("r")])), INFO, errors=ERRORS, read_states=read_states
    )
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(m._poll_once(), 3)
    with pytest.raises(NotReadyError, match="ConnectionError") as probe:
        m.health()
    with pytest.raises(UnavailableError) as call:
        await m.embed(REQUEST)
    for shown in (probe.value.message, call.value.message):
        assert "10.20.30.40" not in shown and "session_x" not in shown
    assert "10.20.30.40" in caplog.text  # the operator's log keeps it


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_address_nobody_answers_fails_at_once_without_ray_init(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ray.init`` retried 127.0.0.1:1 (or a name that does not resolve) for ~14 minutes."""
    monkeypatch.setattr(ray_deploy, "_connected", [])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inits: list[object] = []
    fake_ray = SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: inits.append(kw))
    for address in (f"127.0.0.1:{closed_port()}", "bogus-host-xyz.invalid:16379"):
        started = time.monotonic()
        with pytest.raises(
            FatalBackendError, match=re.escape(f"cannot connect to the Ray cluster at {address!r}")
        ):
            ray_deploy.connect(fake_ray, address)
        assert time.monotonic() - started < ray_deploy.CONNECT_CHECK_S + 2
    assert inits == []
    with socket.socket() as listening:  # a port that accepts: on to ray.init
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        ray_deploy.connect(fake_ray, f"127.0.0.1:{listening.getsockname()[1]}")
    assert len(inits) == 1


def test_a_blocked_load_does_not_keep_the_process_alive_after_it_is_given_up() -> None:
    """Ctrl-C while ``ray.init`` retried: the loading thread (a pool's, joined at exit) kept
    the process alive. ``run_lowered``'s thread is a daemon."""
    script = textwrap.dedent(
        """
        import asyncio, threading
        from embedplex.serve.process_tuning import run_lowered

        async def main():
            try:
                await asyncio.wait_for(run_lowered(threading.Event().wait, 0), 0.2)
            except TimeoutError:
                print("gave up")

        asyncio.run(main())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "gave up" in out.stdout, out.stderr


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def app(status: str, message: str = "", deployment_message: str = "") -> SimpleNamespace:
    deployment = SimpleNamespace(message=deployment_message)
    return SimpleNamespace(
        status=status, message=message, deployments={"EmbedplexReplica": deployment}
    )


UNPLACEABLE = (
    "Deployment 'EmbedplexReplica' in application 'embedplex-m' has 1 replicas that have taken "
    'more than 30s to be scheduled. ... Resources required for each replica: {"CPU": 8}, '
    'total resources available: {"CPU": 2.0}.'
)


def test_replicas_that_cannot_be_placed_fail_the_start_with_serves_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A blocking serve.run waited forever ("loading", nothing logged): the start now fails at
    ray_start_timeout_s, having said what Serve says every 30 s."""
    clock = Clock()
    reads = iter([None] + [app("DEPLOYING", deployment_message=UNPLACEABLE)] * 1000)
    with (
        caplog.at_level(logging.WARNING, "embedplex.models.ray_deploy"),
        pytest.raises(FatalBackendError) as info,
    ):
        ray_deploy.wait_running(
            lambda: next(reads), "m", "embedplex-m", 100, sleep=clock.sleep, clock=clock
        )
    assert 100 <= clock.now <= 101
    message = info.value.message
    assert "embedplex-m is not running after 100s" in message
    assert 'Resources required for each replica: {"CPU": 8}' in message
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all("Resources required" in w for w in warnings)
    assert "not running after 30s (DEPLOYING)" in warnings[0]


def test_a_failed_deploy_names_the_deployments_reason() -> None:
    """Serve's own exception said only "Failed to update the deployments"."""
    clock = Clock()
    traceback = "Traceback (most recent call last):\n  ...\nOSError: /models/nope is not a model"
    failed = app(
        "DEPLOY_FAILED",
        message="Failed to update the deployments ['EmbedplexReplica'].",
        deployment_message="The deployment failed to start 3 times in a row.\n" + traceback,
    )
    with pytest.raises(FatalBackendError) as info:
        ray_deploy.wait_running(
            lambda: failed, "m", "embedplex-m", 100, sleep=clock.sleep, clock=clock
        )
    assert info.value.message == (
        "model 'm': Ray Serve could not deploy embedplex-m: OSError: /models/nope is not a model"
    )
    assert clock.now == 0
    ray_deploy.wait_running(lambda: app("RUNNING"), "m", "embedplex-m", 1, clock=clock)
    assert len(ray_deploy.short("x" * 1000)) == ray_deploy.MESSAGE_CHARS


def test_a_running_application_with_other_options_is_named_key_by_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It was reused silently while the gateway sized its cap from its own table: the Serve
    options the table decides are compared with those Serve reports the application runs
    with (the shape of Ray 2.60's ``get_serve_details``), and each difference named."""
    from embedplex.ray.application import deployment_options

    reported = {  # a deployment of replicas = 1, Serve's defaults around it
        "name": "EmbedplexReplica",
        "num_replicas": 1,
        "max_ongoing_requests": 512,
        "user_config": None,
        "graceful_shutdown_timeout_s": 5.0,
        "ray_actor_options": {"num_cpus": 1.0},  # num_gpus: Serve's default, 0
    }
    running = ray_deploy.serve_options(reported)
    same = ray_deploy.serve_options(deployment_options(ray_config(replicas=1)))
    assert running == same
    scaled = {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 8}
    other = ray_config(autoscaling=scaled, num_cpus=0.5, max_concurrent_requests=1024)
    with caplog.at_level(logging.INFO, "embedplex.models.ray_deploy"):
        assert not ray_deploy.warn_if_different("m", "embedplex-m", running, same)
        assert ray_deploy.warn_if_different(
            "m", "embedplex-m", running, ray_deploy.serve_options(deployment_options(other))
        )
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    for difference in (
        "replicas: running 1, this table None",
        "autoscaling.min_replicas: running None, this table 0",
        "autoscaling.max_replicas: running None, this table 3",
        "num_cpus: running 1, this table 0.5",
        "max_concurrent_requests, max_batch_requests): running 512, this table 1024",
        "serve delete embedplex-m",
    ):
        assert difference in text, text
    assert "num_gpus" not in text


async def test_a_model_that_scales_to_zero_is_ready_without_replicas() -> None:
    states: list[Any] = [{}]
    scaled = {"min_replicas": 0, "max_replicas": 2}
    m = RayModel(
        ray_config(autoscaling=scaled),
        FakeHandle(Method([])),
        INFO,
        errors=ERRORS,
        read_states=lambda: states[0],
    )
    await m._poll_once()
    m.health()  # no replica until a request comes: still ready
    states[0] = ray_module.ServeState({"STARTING": 1}, failed="The deployment failed to start")
    await m._poll_once()
    with pytest.raises(NotReadyError):
        m.health()
    fixed = RayModel(ray_config(), FakeHandle(Method([])), INFO, errors=ERRORS, read_states=dict)
    await fixed._poll_once()
    with pytest.raises(NotReadyError, match="no Ray replica is running"):
        fixed.health()


async def test_ray_answers_count_inputs_and_tokens_and_gone_replicas_leave_the_metrics() -> None:
    metrics = Metrics()
    live: list[frozenset[str]] = [frozenset({"a", "b"})]
    m = RayModel(
        ray_config(),
        FakeHandle(Method([ok("a"), ok("b"), ok("c")])),
        INFO,
        errors=ERRORS,
        read_states=lambda: ray_module.ServeState({"RUNNING": 2}, live=live[0]),
    )
    m.instrument(Telemetry(metrics))
    await m.embed(REQUEST)
    await m.embed(REQUEST)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "m", **labels})

    assert sample("embedplex_inputs_total") == 2 and sample("embedplex_tokens_total") == 6
    await m._poll_once()
    assert sample("embedplex_ray_replica_requests_total", replica="a") == 1
    live[0] = frozenset({"b", "c"})  # a restarted as c
    await m._poll_once()
    await m.embed(REQUEST)
    assert sample("embedplex_ray_replica_requests_total", replica="a") is None
    assert sample("embedplex_ray_replica_requests_total", replica="b") == 1
    assert m.stats()["requests_per_replica"] == {"b": 1, "c": 1}


async def test_a_second_loss_tells_when_to_retry() -> None:
    m = RayModel(
        ray_config(), FakeHandle(Method([fail(Lost()), fail(Lost())])), INFO, errors=ERRORS
    )
    with pytest.raises(UnavailableError, match="and so did the retry") as info:
        await m.embed(REQUEST)
    assert info.value.retry_after == 1


def test_model_info_from_a_replica_of_another_release_unpickles() -> None:
    """Replicas answer ``info()`` pickled: one of an earlier release has fewer fields (the
    labels came later; the dataclass's own unpickling left them unset and /info answered 500),
    one of a later release more."""
    info = INFO
    assert pickle.loads(pickle.dumps(info)) == info
    state = info.__getstate__()
    older = info.__class__.__new__(info.__class__)
    older.__setstate__(state[:-2])  # as a replica of the release before the labels sends it
    assert (older.id2label, older.label2id) == (None, None) and older.name == info.name
    newer = info.__class__.__new__(info.__class__)
    newer.__setstate__((*state, "a field this release does not know"))
    assert newer == info
