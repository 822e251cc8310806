"""Every metric is exported and moves with real requests (read back from ``GET /metrics``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
import pytest

from embedplex.backends.fake import FakeBackend
from embedplex.observability import CircuitState

from .conftest import (
    MODEL,
    Served,
    eventually,
    live_server,
    parse_metrics,
    serve,
    settings,
    value,
)

TEXTS = ["a short one", "a somewhat longer sentence to pad against", "three"]


async def test_request_and_batch_metrics(served: Served) -> None:
    c = served.client
    r1 = await c.post("/v1/embeddings", json={"input": TEXTS, "model": MODEL})
    r2 = await c.post("/embed", json={"inputs": "hello"})
    assert r1.status_code == r2.status_code == 200
    tokens = r1.json()["usage"]["prompt_tokens"]
    assert (await c.post("/embed", json={"inputs": []})).status_code == 400
    assert (await c.post("/embed", json={"wrong": 1})).status_code == 422

    m = await served.metrics()
    openai = {"route": "/v1/embeddings", "model": MODEL}
    embed = {"route": "/embed", "model": MODEL}
    assert value(m, "embedplex_requests_total", **openai) == 1
    assert value(m, "embedplex_request_success_total", **openai) == 1
    assert value(m, "embedplex_requests_total", **embed) == 2  # the empty one reached the model
    assert value(m, "embedplex_request_failures_total", **embed, error_type="empty") == 1
    assert value(m, "embedplex_requests_total", route="/embed", model="-") == 1
    assert (
        value(
            m,
            "embedplex_request_failures_total",
            route="/embed",
            model="-",
            error_type="validation",
        )
        == 1
    )
    assert value(m, "embedplex_request_duration_seconds_count", **openai) == 1
    assert value(m, "embedplex_request_duration_seconds_sum", **openai) > 0
    for stage in ("tokenization", "queue", "inference"):
        assert value(m, f"embedplex_{stage}_duration_seconds_count", model=MODEL) == 2

    assert value(m, "embedplex_inputs_total", model=MODEL) == 4
    assert value(m, "embedplex_tokens_total", model=MODEL) > tokens  # + "hello"
    batches = value(m, "embedplex_batch_size_count", model=MODEL)
    assert batches >= 2
    assert value(m, "embedplex_batch_size_sum", model=MODEL) == 4
    assert value(m, "embedplex_batch_tokens_sum", model=MODEL) >= value(
        m, "embedplex_tokens_total", model=MODEL
    )
    assert value(m, "embedplex_batch_padding_ratio_count", model=MODEL) == batches
    # The three texts differ in length, so their batch carried padding.
    assert value(m, "embedplex_batch_padding_ratio_sum", model=MODEL) > 0
    assert value(m, "embedplex_batch_duration_seconds_count", model=MODEL) == batches

    # Current state, read from the gateway at scrape time.
    assert value(m, "embedplex_queue_size", model=MODEL) == 0
    assert value(m, "embedplex_requests_in_flight", model=MODEL) == 0
    assert value(m, "embedplex_batches_in_flight", model=MODEL) == 0
    assert value(m, "embedplex_max_batch_size", model=MODEL) == 128
    assert value(m, "embedplex_ready") == 1

    build = [k for k in m if k[0] == "embedplex_build_info"]
    assert len(build) == 1
    labels = dict(build[0][1])
    assert labels["model"] == MODEL
    assert labels["backend"] == "fake"
    assert labels["dtype"] == "float32"
    assert labels["version"]
    assert value(m, "embedplex_uptime_seconds") > 0
    assert value(m, "embedplex_process_resident_memory_bytes") > 0
    assert ("embedplex_process_cpu_seconds_total", ()) in m


async def test_probes_and_scrapes_are_not_counted(served: Served) -> None:
    await served.client.get("/health/ready")
    await served.client.get("/metrics")
    m = await served.metrics()
    assert not [k for k in m if k[0] == "embedplex_requests_total"]


async def test_failed_scrapes_and_status_logins_and_lookalike_paths_are_counted() -> None:
    """Only the successful answers of the quiet paths are left out, and only of those paths
    exactly: a wrong key for /metrics or a wrong admin secret is a failure like any other, and
    /healthz or /metricsfoo an unknown path."""
    key = "sk-obs-quiet-0123456789abcdef"
    auth = {"authorization": f"Bearer {key}"}
    async with serve(settings(api_key=key)) as srv:
        c = srv.client
        assert (await c.get("/health/ready")).status_code == 200
        assert (await c.get("/api/v1/status", headers=auth)).status_code == 200
        assert (await c.get("/metrics")).status_code == 401  # no key
        wrong = {"x-admin-secret": "not-the-secret"}
        refused = (await c.get("/api/v1/status", headers={**auth, **wrong})).status_code
        assert refused == 401
        for path in ("/healthz", "/metricsfoo", "/pingx", "/docs2"):
            assert (await c.get(path, headers=auth)).status_code == 404
        r = await c.get("/metrics", headers=auth)
        assert r.status_code == 200
        m = parse_metrics(r.text)
    scrape = {"route": "/metrics", "model": "-"}
    assert value(m, "embedplex_requests_total", **scrape) == 1  # the refused one only
    assert value(m, "embedplex_request_failures_total", **scrape, error_type="authentication") == 1
    status = {"route": "/api/v1/status", "model": "-"}
    assert value(m, "embedplex_requests_total", **status) == 1
    assert value(m, "embedplex_request_success_total", **status) == 0
    unmatched = {"route": "unmatched", "model": "-"}
    assert value(m, "embedplex_request_failures_total", **unmatched, error_type="not_found") == 4
    assert not [k for k in m if "/health/ready" in str(k)]


async def test_queue_full_is_a_429_refusal() -> None:
    s = settings(
        max_queue_size=2, max_client_batch_size=2, max_batch_requests=1, inference_streams=1
    )
    async with serve(s, backend=FakeBackend(delay=0.3)) as srv:
        first = asyncio.create_task(srv.client.post("/embed", json={"inputs": ["a", "b"]}))
        await eventually(lambda: srv.app.state.gateway.stats()[MODEL]["in_flight_batches"] == 1)
        # One input runs, one waits: two more do not fit in a queue of two.
        refused = await srv.client.post("/embed", json={"inputs": ["c", "d"]})
        assert refused.status_code == 429
        assert (await first).status_code == 200
        m = await srv.metrics()
    assert value(m, "embedplex_refusals_total", model=MODEL, status="429") == 1
    assert value(m, "embedplex_refused_inputs_total", model=MODEL) == 2
    assert (
        value(
            m,
            "embedplex_request_failures_total",
            route="/embed",
            model=MODEL,
            error_type="overloaded",
        )
        == 1
    )


async def test_queue_timeout_is_a_503_refusal() -> None:
    s = settings(queue_timeout_ms=50, max_batch_requests=1, inference_streams=1)
    async with serve(s, backend=FakeBackend(delay=0.3)) as srv:
        r = await srv.client.post("/embed", json={"inputs": ["a", "b"]})
        assert r.status_code == 503
        m = await srv.metrics()
    assert value(m, "embedplex_expired_inputs_total", model=MODEL) == 1
    assert value(m, "embedplex_refusals_total", model=MODEL, status="503") == 1
    assert (
        value(
            m,
            "embedplex_request_failures_total",
            route="/embed",
            model=MODEL,
            error_type="queue_timeout",
        )
        == 1
    )


async def test_failed_batch_is_counted() -> None:
    backend = FakeBackend()
    backend.fail_next = 1
    async with serve(backend=backend) as srv:
        r = await srv.client.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 424
        m = await srv.metrics()
    assert value(m, "embedplex_batch_failures_total", model=MODEL, error_type="backend") == 1
    assert value(m, "embedplex_inputs_total", model=MODEL) == 0
    labels = {"route": "/v1/embeddings", "model": MODEL, "error_type": "backend"}
    assert value(m, "embedplex_request_failures_total", **labels) == 1


async def test_inputs_of_a_departed_client_are_dropped() -> None:
    from embedplex.api.app import create_app

    from .conftest import fake_factory, parse_metrics

    s = settings(max_batch_requests=1, inference_streams=1)
    app = create_app(s, gateway_factory=fake_factory(FakeBackend(delay=0.4)))

    def scenario() -> dict[object, float]:
        with live_server(app) as url:
            # The client gives up while its second input still waits.
            with contextlib.suppress(httpx.ReadTimeout):
                httpx.post(url + "/embed", json={"inputs": ["a", "b"]}, timeout=0.15)
            for _ in range(100):
                m = parse_metrics(httpx.get(url + "/metrics").text)
                if value(m, "embedplex_dropped_inputs_total", model=MODEL):
                    return m
                time.sleep(0.02)
            return m

    m = await asyncio.to_thread(scenario)
    assert value(m, "embedplex_dropped_inputs_total", model=MODEL) == 1
    labels = {"route": "/embed", "model": MODEL, "error_type": "client_gone"}
    assert value(m, "embedplex_request_failures_total", **labels) == 1


async def test_provider_observer_feeds_upstream_metrics(served: Served) -> None:
    obs = served.telemetry.providers
    obs.on_upstream_call("openai", 96, 0.25, "200")
    obs.on_upstream_call("openai", 32, 0.5, "429")
    obs.on_retry("openai", "429")
    obs.on_circuit_state("openai", CircuitState.OPEN)
    obs.on_batch_size("openai", 64)
    m = await served.metrics()
    assert value(m, "embedplex_upstream_requests_total", provider="openai", status="200") == 1
    assert value(m, "embedplex_upstream_requests_total", provider="openai", status="429") == 1
    assert value(m, "embedplex_upstream_duration_seconds_sum", provider="openai") == 0.75
    assert value(m, "embedplex_upstream_inputs_per_call_count", provider="openai") == 2
    assert value(m, "embedplex_upstream_inputs_per_call_sum", provider="openai") == 128
    assert value(m, "embedplex_upstream_inputs_total", provider="openai") == 128
    assert value(m, "embedplex_upstream_retries_total", provider="openai", reason="429") == 1
    assert value(m, "embedplex_circuit_state", provider="openai") == 2
    assert value(m, "embedplex_aimd_batch_size", provider="openai") == 64


async def test_metrics_port_serves_the_same_registry() -> None:
    async with serve(settings(metrics_port=0)) as srv:
        assert (await srv.client.post("/embed", json={"inputs": "hi"})).status_code == 200
        port = srv.app.state.metrics_port
        r = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics")
    assert r.status_code == 200
    assert 'embedplex_requests_total{model="test-model",route="/embed"} 1.0' in r.text


async def test_the_metrics_server_logs_where_it_listens_and_binds_metrics_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Port 0 picks a port, which was never told; and the metrics server bound --host
    (0.0.0.0 in the images) with no way to keep it local: --metrics-host says where."""
    caplog.set_level(logging.INFO, logger="embedplex.api.app")
    async with serve(settings(metrics_port=0)) as srv:
        port = srv.app.state.metrics_port
    assert f"metrics: http://127.0.0.1:{port}/metrics" in caplog.messages
    caplog.clear()
    async with serve(settings(metrics_port=0, metrics_host="127.0.0.2")) as srv:
        port = srv.app.state.metrics_port
        there = await asyncio.to_thread(httpx.get, f"http://127.0.0.2:{port}/metrics")
        with pytest.raises(httpx.ConnectError):  # not on host's address
            await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics")
    assert there.status_code == 200
    assert f"metrics: http://127.0.0.2:{port}/metrics" in caplog.messages


async def test_unknown_paths_share_one_label(served: Served) -> None:
    for path in ("/nope", "/v2/whatever", "/a/b/c"):
        assert (await served.client.get(path)).status_code == 404
    m = await served.metrics()
    labels = {"route": "unmatched", "model": "-"}
    assert value(m, "embedplex_requests_total", **labels) == 3
    assert value(m, "embedplex_request_failures_total", **labels, error_type="not_found") == 3
    assert not [k for k in m if k[0] == "embedplex_requests_total" and "/nope" in str(k)]
