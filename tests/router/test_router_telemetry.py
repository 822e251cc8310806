"""The router reports to telemetry: routed requests through a fake upstream, read back from
``/metrics``, ``/api/v1/status`` and the in-memory span exporter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.observability import CircuitState, Telemetry
from embedplex.providers.config import ProviderConfig, RouteConfig
from helpers import eventually, parse_metrics, value
from upstream_fakes import FakeUpstream, Fault, provider

SECRET = "s3cret-admin-secret"
ADMIN = {"authorization": f"Bearer {SECRET}"}
Samples = dict[Any, float]


def routed(*providers: ProviderConfig, **kw: Any) -> Settings:
    """A providers-only server serving each provider as the model ``remote-<name>``."""
    return Settings(
        local_model=False,
        admin_secret=SECRET,
        provider_allowed_networks=["127.0.0.0/8"],  # the fake upstreams run on loopback
        providers=list(providers),
        routes=[RouteConfig(model=f"remote-{p.name}", providers=[p.name]) for p in providers],
        **kw,
    )


@asynccontextmanager
async def serve(
    settings: Settings, telemetry: Telemetry | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, telemetry=telemetry)
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield client


async def metrics(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return parse_metrics(r.text)


async def embed(client: httpx.AsyncClient, model: str, texts: list[str]) -> httpx.Response:
    return await client.post("/v1/embeddings", json={"model": model, "input": texts})


def calls(m: Samples, provider: str, status: str) -> float:
    return value(m, "embedplex_upstream_requests_total", provider=provider, status=status)


async def test_attempts_retries_and_aimd_are_counted(upstream: FakeUpstream) -> None:
    upstream.script(Fault(status=429, retry_after="0"), Fault(status=500))
    async with serve(routed(provider("a", upstream, max_attempts=3, max_batch_size=16))) as c:
        before = await metrics(c)
        # Reported at start: the initial batch size and a closed circuit.
        assert value(before, "embedplex_aimd_batch_size", provider="a") == 16
        assert value(before, "embedplex_circuit_state", provider="a") == CircuitState.CLOSED
        r = await embed(c, "remote-a", ["one", "two", "three"])
        assert r.status_code == 200
        m = await metrics(c)
    # One logical call, three HTTP attempts: 429, then 500, then 200; two retries.
    assert len(upstream.calls) == 3
    assert [calls(m, "a", s) for s in ("429", "500", "200")] == [1, 1, 1]
    assert value(m, "embedplex_upstream_retries_total", provider="a", reason="429") == 1
    assert value(m, "embedplex_upstream_retries_total", provider="a", reason="500") == 1
    assert value(m, "embedplex_upstream_inputs_total", provider="a") == 9  # 3 texts x 3 attempts
    assert value(m, "embedplex_upstream_duration_seconds_count", provider="a") == 3
    # The 429 halved the AIMD size; the success afterwards added the step (4) back.
    assert value(m, "embedplex_aimd_batch_size", provider="a") == 12
    # The route counts as a model in request metrics; its provider's lane reports batches.
    route = {"route": "/v1/embeddings", "model": "remote-a"}
    assert value(m, "embedplex_request_success_total", **route) == 1
    assert value(m, "embedplex_batch_size_count", model="a") == 1
    assert value(m, "embedplex_inputs_total", model="a") == 3
    assert value(m, "embedplex_queue_size", model="remote-a") == 0


async def test_413_shrinks_the_aimd_batch_size(upstream: FakeUpstream) -> None:
    upstream.max_texts = 2  # the upstream answers 413 above two texts
    # Calls never beat the latency target: AIMD only shrinks, so the gauge shows the 413s.
    config = provider("a", upstream, max_batch_size=8, latency_target_ms=0.001)
    async with serve(routed(config)) as c:
        assert value(await metrics(c), "embedplex_aimd_batch_size", provider="a") == 8
        r = await embed(c, "remote-a", [f"t{i}" for i in range(8)])
        assert r.status_code == 200
        m = await metrics(c)
    assert calls(m, "a", "413") >= 1
    assert calls(m, "a", "200") == 4  # split down to calls of two texts
    assert value(m, "embedplex_aimd_batch_size", provider="a") < 8


async def test_concurrent_single_text_callers_share_upstream_calls(
    upstream: FakeUpstream,
) -> None:
    upstream.delay = 0.05  # while one call is out, the next callers gather in the lane
    config = provider("a", upstream, max_concurrency=1, max_wait_ms=50)
    async with serve(routed(config)) as c:
        responses = await asyncio.gather(*(embed(c, "remote-a", [f"text {i}"]) for i in range(20)))
        assert [r.status_code for r in responses] == [200] * 20
        m = await metrics(c)
        status = (await c.get("/api/v1/status", headers=ADMIN)).json()
    n_calls = value(m, "embedplex_upstream_inputs_per_call_count", provider="a")
    n_inputs = value(m, "embedplex_upstream_inputs_per_call_sum", provider="a")
    assert n_inputs == 20
    assert n_calls == len(upstream.calls) < 20
    assert n_inputs / n_calls > 1  # the compression ratio
    # embedplex status: a remote model's recent batches are its providers' lanes' batches.
    recent = status["models"]["remote-a"]["recent"]
    assert recent["batches"] == n_calls
    assert recent["mean_batch_size"] > 1


async def test_circuit_state_follows_the_breaker(upstream: FakeUpstream) -> None:
    config = provider("a", upstream, max_attempts=1, breaker_failures=2, breaker_cooldown_s=0.2)
    upstream.script(Fault(status=500), Fault(status=500))
    async with serve(routed(config)) as c:
        assert [(await embed(c, "remote-a", ["x"])).status_code for _ in range(2)] == [502, 502]
        m = await metrics(c)
        assert value(m, "embedplex_circuit_state", provider="a") == CircuitState.OPEN
        assert calls(m, "a", "500") == 2
        assert value(m, "embedplex_upstream_retries_total", provider="a", reason="500") == 0

        async def half_open() -> bool:
            await c.get(
                "/api/v1/status", headers=ADMIN
            )  # reading the state notices the cool-down's end
            state = value(await metrics(c), "embedplex_circuit_state", provider="a")
            return state == CircuitState.HALF_OPEN

        await eventually(half_open, 5)
        assert (await embed(c, "remote-a", ["x"])).status_code == 200  # the probe
        m = await metrics(c)
    assert value(m, "embedplex_circuit_state", provider="a") == CircuitState.CLOSED


async def test_the_routers_probe_is_an_upstream_call_not_a_client_input(
    upstream: FakeUpstream,
) -> None:
    """The prober closes a half-open circuit with no client traffic; its call counts as an
    upstream attempt, never as an input embedded for a client (inputs, batch sizes, recent)."""
    config = provider("a", upstream, max_attempts=1, breaker_failures=2, breaker_cooldown_s=0.2)
    upstream.script(Fault(status=500), Fault(status=500))
    async with serve(routed(config, router_probe_interval_s=0.1)) as c:
        assert [(await embed(c, "remote-a", ["x"])).status_code for _ in range(2)] == [502, 502]
        before = await metrics(c)

        async def closed() -> bool:
            state = value(await metrics(c), "embedplex_circuit_state", provider="a")
            return state == CircuitState.CLOSED

        await eventually(closed, 5)  # the prober's call, nobody else's
        m = await metrics(c)
        status = (await c.get("/api/v1/status", headers=ADMIN)).json()
    assert len(upstream.calls) == 3
    assert calls(m, "a", "200") == 1
    assert value(m, "embedplex_upstream_inputs_total", provider="a") == 3
    for name in ("embedplex_inputs_total", "embedplex_batch_size_count"):
        assert value(m, name, model="a") == value(before, name, model="a"), name
    assert status["models"]["remote-a"]["recent"]["inputs_per_s"] == 0
    assert status["providers"]["a"]["counters"]["probes"] == 1


async def test_providers_added_at_run_time_are_instrumented(upstream: FakeUpstream) -> None:
    async with serve(routed(provider("a", upstream))) as c:
        config = provider("late", upstream, max_batch_size=32)
        r = await c.post(
            "/api/v1/providers",
            json={"provider": config.model_dump(mode="json"), "serve_as": "late-model"},
            headers=ADMIN,
        )
        assert r.status_code == 201
        assert (await embed(c, "late-model", ["x", "y"])).status_code == 200
        m = await metrics(c)
    assert calls(m, "late", "200") == 1
    assert value(m, "embedplex_upstream_inputs_per_call_sum", provider="late") == 2
    assert value(m, "embedplex_aimd_batch_size", provider="late") == 32
    assert value(m, "embedplex_batch_size_count", model="late") == 1
    assert value(m, "embedplex_request_success_total", route="/v1/embeddings", model="late-model")


def build_models(m: Samples) -> list[str]:
    return sorted(dict(k[1])["model"] for k in m if k[0] == "embedplex_build_info")


async def test_a_removed_provider_leaves_no_gauges_and_one_added_again_reports_afresh(
    upstream: FakeUpstream,
) -> None:
    """Its circuit, AIMD size and served model go with it; its counts stay (Prometheus
    counters never go back); the same name added again reports its own state."""
    async with serve(routed(provider("a", upstream))) as c:
        config = provider("tmp1", upstream, max_batch_size=32).model_dump(mode="json")
        body = {"provider": config, "serve_as": "tmpmodel"}
        assert (await c.post("/api/v1/providers", json=body, headers=ADMIN)).status_code == 201
        assert (await embed(c, "tmpmodel", ["x"])).status_code == 200
        m = await metrics(c)
        assert value(m, "embedplex_aimd_batch_size", provider="tmp1") == 32
        assert value(m, "embedplex_circuit_state", provider="tmp1") == CircuitState.CLOSED
        assert build_models(m) == ["remote-a", "tmpmodel"]

        assert (await c.delete("/api/v1/providers/tmp1", headers=ADMIN)).status_code == 200
        gone = await metrics(c)
        config["max_batch_size"] = 8
        assert (await c.post("/api/v1/providers", json=body, headers=ADMIN)).status_code == 201
        again = await metrics(c)
    for name in ("embedplex_aimd_batch_size", "embedplex_circuit_state"):
        assert not [k for k in gone if k[0] == name and "tmp1" in str(k)], name
    assert value(gone, "embedplex_aimd_batch_size", provider="a") > 0  # the others stay
    assert build_models(gone) == ["remote-a"]
    assert calls(gone, "tmp1", "200") == 1  # counts stay
    assert value(gone, "embedplex_inputs_total", model="tmp1") == 1
    assert value(again, "embedplex_aimd_batch_size", provider="tmp1") == 8
    assert value(again, "embedplex_circuit_state", provider="tmp1") == CircuitState.CLOSED
    assert build_models(again) == ["remote-a", "tmpmodel"]


async def test_each_upstream_attempt_is_a_span_under_its_request(upstream: FakeUpstream) -> None:
    exporter = InMemorySpanExporter()
    settings = routed(provider("a", upstream, max_attempts=2))
    telemetry = Telemetry.from_settings(settings, span_exporter=exporter)
    upstream.script(Fault(status=500))
    async with serve(settings, telemetry) as c:
        assert (await embed(c, "remote-a", ["hello", "world"])).status_code == 200
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "POST /v1/embeddings"]
    attempts = sorted((s for s in spans if s.name == "upstream a"), key=lambda s: s.start_time or 0)
    assert len(attempts) == 2
    for span in attempts:
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None
        assert span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        assert span.attributes is not None
        assert span.attributes["embedplex.inputs"] == 2
    failed, ok = attempts
    assert failed.attributes is not None and ok.attributes is not None
    assert failed.attributes["http.response.status_code"] == 500
    assert not failed.status.is_ok
    assert (ok.attributes["http.response.status_code"], ok.attributes["embedplex.retry"]) == (
        200,
        1,
    )
    # The lane's batch span (a root linked to the request), as for local models.
    (batch,) = [s for s in spans if s.name == "batch inference"]
    assert [link.context.span_id for link in batch.links] == [request.context.span_id]
