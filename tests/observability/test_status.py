"""``GET /api/v1/status`` and the ``embedplex status`` / ``embedplex health`` commands."""

from __future__ import annotations

import asyncio
import json

from typer.testing import CliRunner

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.cli.main import app as cli

from .conftest import ADMIN_SECRET, MODEL, Served, fake_factory, live_server, settings


async def test_status_route_reports_models_queues_throughput_errors(served: Served) -> None:
    c = served.client
    for _ in range(3):
        assert (await c.post("/embed", json={"inputs": ["a", "b"]})).status_code == 200
    assert (await c.post("/embed", json={"inputs": []})).status_code == 400
    body = (await c.get("/api/v1/status")).json()
    assert body["ready"] is True
    assert body["status"] == "ready"
    assert body["uptime_s"] > 0
    model = body["models"][MODEL]
    assert model["backend"] == "fake"
    assert model["queued"] == 0
    assert model["in_flight_batches"] == 0
    assert model["max_batch_requests"] == 128
    assert model["batches"] >= 3
    recent = model["recent"]
    assert recent["inputs_per_s"] == 6 / recent["window_s"]
    assert recent["batches"] == model["batches"]
    assert recent["max_batch_size"] == 2
    assert model["errors"] == {"empty": 1}


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


async def test_status_and_health_commands_read_a_running_server() -> None:
    backend = FakeBackend()
    app = create_app(settings(), gateway_factory=fake_factory(backend))

    def scenario() -> None:
        with live_server(app) as url:
            import httpx

            httpx.post(url + "/embed", json={"inputs": ["hello", "world"]}).raise_for_status()
            code, out = run_cli("status", "--url", url, "--admin-secret", ADMIN_SECRET)
            assert code == 0, out
            assert "Models" in out
            assert MODEL in out
            assert "ready" in out
            code, out = run_cli("status", "--url", url, "--json", "--admin-secret", ADMIN_SECRET)
            assert code == 0
            assert json.loads(out)["models"][MODEL]["recent"]["batches"] >= 1
            code, out = run_cli("health", "--url", url)
            assert code == 0, out
            assert "ready" in out
            backend.die()
            code, out = run_cli("health", "--url", url, "--json")
            assert code == 1
            assert json.loads(out)["live"] is True
            assert json.loads(out)["ready"] is False

    await asyncio.to_thread(scenario)


def test_commands_against_nothing_exit_2() -> None:
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    assert run_cli("health", "--url", url)[0] == 2
    assert run_cli("status", "--url", url)[0] == 2


def test_commands_given_no_url_at_all_say_so_in_one_line_and_exit_2() -> None:
    """A typo'd port ("8080x") is no HTTP error to httpx, and ended in a 130-line traceback."""
    url = "http://127.0.0.1:8080x"
    code, out = run_cli("status", "--url", url)
    assert (code, out) == (2, f"cannot read {url}/api/v1/status: Invalid port: '8080x'\n")
    code, out = run_cli("health", "--url", url, "--json")
    assert code == 2 and json.loads(out)["status"] == "unreachable: Invalid port: '8080x'"
    code, out = run_cli("bench", "load", "--url", url, "--requests", "1")
    assert code == 2 and "Traceback" not in out
    assert "url must be http://host:port[/path], got" in out and "8080x" in out  # wrapped


async def test_status_command_sends_the_admin_secret() -> None:
    app = create_app(
        settings(api_key="k-123", admin_secret="status-admin-secret-456"),
        gateway_factory=fake_factory(FakeBackend()),
    )

    def scenario() -> None:
        with live_server(app) as url:
            for wrong in ([], ["--admin-secret", "k-123"]):
                code, out = run_cli("status", "--url", url, *wrong)
                assert code == 2, out
                assert out.strip() == (
                    f"cannot read {url}/api/v1/status: 401: missing or invalid admin secret "
                    "(pass the server's admin secret with --admin-secret or "
                    "EMBEDPLEX_ADMIN_SECRET)"
                )
            code, out = run_cli("status", "--url", url, "--admin-secret", "status-admin-secret-456")
            assert code == 0, out
            assert "status-admin-secret-456" not in out

    await asyncio.to_thread(scenario)


async def test_status_command_says_the_server_needs_an_admin_secret() -> None:
    """The quickstart server has none: its own 403 message is printed, not httpx's text."""
    app = create_app(settings(admin_secret=None), gateway_factory=fake_factory(FakeBackend()))

    def scenario() -> None:
        with live_server(app) as url:
            code, out = run_cli("status", "--url", url, "--admin-secret", "any-admin-secret-789")
            assert code == 2, out
            assert out.strip() == (
                f"cannot read {url}/api/v1/status: 403: the admin API is off: start the server "
                "with an admin secret (EMBEDPLEX_ADMIN_SECRET) to use it"
            )

    await asyncio.to_thread(scenario)


async def test_status_command_gives_a_proxys_status_line_not_its_page() -> None:
    """An error body that is no server's JSON (a proxy's HTML page) is never printed."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse

    proxy = FastAPI()
    proxy.get("/health/ready")(lambda: JSONResponse({"status": "ready"}))
    page = "<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
    proxy.get("/api/v1/status")(lambda: HTMLResponse(page, status_code=502))

    def scenario() -> None:
        with live_server(proxy) as url:
            code, out = run_cli("status", "--url", url, "--admin-secret", ADMIN_SECRET)
            assert code == 2, out
            assert out.strip() == f"cannot read {url}/api/v1/status: 502: Bad Gateway"

    await asyncio.to_thread(scenario)


def test_status_renders_remote_providers() -> None:
    import io

    from rich.console import Console

    from embedplex.cli.status import render_status

    payload = {
        "version": "0.1.0",
        "ready": True,
        "status": "ready",
        "uptime_s": 5,
        "models": {},
        "providers": {
            "voyage": {
                "type": "voyage",
                "endpoint": "https://api.example/v1/embeddings",
                "queued": 3,
                "in_flight_batches": 1,
                "aimd": {"batch_size": 64},
                "health": {
                    "circuit": "open",
                    "success_rate": 0.5,
                    "latency_p50_ms": 12,
                    "latency_p99_ms": 80,
                },
                "counters": {"upstream_calls": 4, "texts": 100},
                "lanes": [{}, {}],
            }
        },
    }
    out = io.StringIO()
    render_status(payload, Console(file=out, width=200))
    text = out.getvalue()
    row = next(line for line in text.splitlines() if "voyage" in line)
    for cell in ("open", "64", "3", "25.0", "50%, 12/80 ms"):
        assert cell in row, cell


def test_status_renders_the_cache_with_refused_redis_values() -> None:
    counts = {"hits_memory": 6, "hits_redis": 2, "redis_refused": 3, "misses": 4}
    cache = {
        "(all models)": {"enabled": True, "bytes": 0, "max_bytes": 1 << 26, "redis": "up"},
        "minilm": {**counts, "dedupe_joined": 1},
    }
    lines = _rendered(cache=cache).splitlines()
    head = next(line for line in lines if "redis refused" in line)
    row = next(line for line in lines if "minilm" in line)
    assert [cell.strip() for cell in head.split("┃")[1:8]] == [
        "model", "memory hits", "redis hits", "redis refused", "misses", "hit rate",
        "joined in flight",
    ]  # fmt: skip
    assert [cell.strip() for cell in row.split("│")[1:8]] == [
        "minilm", "6", "2", "3", "4", "67%", "1"
    ]  # fmt: skip


def _rendered(**sections: object) -> str:
    """``embedplex status``'s text for a ready server's payload with ``sections``."""
    import io

    from rich.console import Console

    from embedplex.cli.status import render_status

    payload = {"version": "0.1.0", "ready": True, "status": "ready", "uptime_s": 5, "models": {}}
    out = io.StringIO()
    render_status({**payload, **sections}, Console(file=out, width=200))
    return out.getvalue()
