"""``embedplex status`` / ``embedplex health`` against answers they cannot take as they are: a
proxy's HTML page, JSON of another shape, a server that answers but is dead, and server strings
that look like rich markup. Each runs the real command against a real uvicorn server."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable

import httpx
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.cli.main import app as cli
from embedplex.cli.status import render_status

from .conftest import ADMIN_SECRET, fake_factory, live_server, settings

PAGE = "<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def answering(answer: Callable[[str], Response]) -> Starlette:
    """A server that answers every GET with ``answer(path)``."""

    async def endpoint(request: Request) -> Response:
        return answer(request.url.path)

    return Starlette(routes=[Route("/{path:path}", endpoint)])


def test_a_proxys_html_page_is_no_embedplex_answer() -> None:
    """HTML 200 (a captive page) and HTML 502 (a proxy whose upstream is down): one line naming
    the status line, exit 2; never a traceback, never the page."""
    cases = [
        (200, "OK", lambda _: HTMLResponse(PAGE)),
        (502, "Bad Gateway", lambda _: HTMLResponse(PAGE, status_code=502)),
    ]
    for code, reason, answer in cases:
        with live_server(answering(answer), wait_ready=False) as url:
            line = f"not an embedplex answer (HTTP {code} {reason}, text/html)"
            for args in (["health"], ["health", "--json"]):
                exit_code, out = run_cli(*args, "--url", url)
                assert exit_code == 2, out
                assert out.strip() == f"cannot read {url}/health/live: {line}"
            if code == 200:  # a refusal (>= 400) of /api/v1/status is test_status's case
                exit_code, out = run_cli("status", "--url", url, "--admin-secret", ADMIN_SECRET)
                assert exit_code == 2, out
                assert out.strip() == f"cannot read {url}/api/v1/status: {line}"


def test_json_of_another_shape_is_no_embedplex_answer() -> None:
    """Another server's JSON: a 404 ``{"detail": ...}`` probe, a status that is a list or has
    no models."""
    not_found = answering(lambda _: JSONResponse({"detail": "Not Found"}, status_code=404))
    with live_server(not_found, wait_ready=False) as url:
        exit_code, out = run_cli("health", "--url", url)
        assert exit_code == 2, out
        assert out.strip() == (
            f"cannot read {url}/health/live: "
            "not an embedplex answer (HTTP 404 Not Found, application/json)"
        )
    for document in ([1, 2], {"ready": True, "status": "ready", "models": []}, "ready"):

        def answer(path: str, document: object = document) -> Response:
            return JSONResponse({"status": "ready"} if path.startswith("/health") else document)

        with live_server(answering(answer)) as url:
            exit_code, out = run_cli("status", "--url", url, "--admin-secret", ADMIN_SECRET)
            assert exit_code == 2, (document, out)
            assert out.strip() == (
                f"cannot read {url}/api/v1/status: "
                "not an embedplex answer (HTTP 200 OK, application/json)"
            )


async def test_health_of_a_dead_model_is_not_ready_not_unreachable() -> None:
    """A hung forward pass marks the model dead; with no liveness grace /health/live is 503
    at once. The server answered both probes: exit 1 (not ready), not 2 (unreachable)."""
    backend = FakeBackend(delay=1.0)
    app = create_app(
        settings(inference_timeout_s=0.2, liveness_grace_s=0),
        gateway_factory=fake_factory(backend),
    )

    def scenario() -> None:
        with live_server(app) as url:
            hung = httpx.post(url + "/embed", json={"inputs": "a"}, timeout=10)
            assert hung.status_code == 503, hung.text
            assert httpx.get(url + "/health/live").status_code == 503
            exit_code, out = run_cli("health", "--url", url, "--json")
            assert exit_code == 1, out
            health = json.loads(out)
            assert health["reachable"] is True
            assert health["live"] is False and health["ready"] is False
            assert "inference hung" in health["status"]
            exit_code, out = run_cli("health", "--url", url)
            assert exit_code == 1, out
            assert "inference hung" in out

    await asyncio.to_thread(scenario)


def test_unreachable_health_says_so_in_its_document() -> None:
    exit_code, out = run_cli("health", "--url", "http://127.0.0.1:9", "--json")
    assert exit_code == 2
    health = json.loads(out)
    assert health["reachable"] is False and health["status"].startswith("unreachable: ")


def test_server_strings_are_never_read_as_markup() -> None:
    """A reason naming ``[/tmp/model]`` (a closing tag to rich) and ``[bold]`` print as sent."""
    reason = "loading [/tmp/model] [bold]x[/bold]"

    def answer(path: str) -> Response:
        if path == "/api/v1/status":
            status = {"version": "0.1.0", "ready": False, "status": reason, "models": {}}
            return JSONResponse(status)
        return JSONResponse({"status": reason}, status_code=503 if path.endswith("ready") else 200)

    with live_server(answering(answer), wait_ready=False) as url:
        exit_code, out = run_cli("status", "--url", url, "--admin-secret", ADMIN_SECRET)
        assert exit_code == 0, out
        assert f"at {url}: {reason}, up 0m 00s" in out
        exit_code, out = run_cli("health", "--url", url)
        assert exit_code == 1, out
        assert reason in out


def _rendered(payload: dict[str, object]) -> str:
    out = io.StringIO()
    render_status(payload, Console(file=out, width=300))
    return out.getvalue()


def test_status_tables_print_server_strings_as_they_are() -> None:
    """An IPv6 endpoint (``[fd00::5]`` reads as a tag) and bracketed model, provider, error,
    cache and section names."""
    endpoint = "http://[fd00::5]:8080/v1/embeddings"
    model = {"backend": "[b]onnx", "device": "cpu", "dtype": "float32", "errors": {"[/x]": 2}}
    text = _rendered(
        {
            "version": "0.1.0",
            "ready": True,
            "status": "ready",
            "uptime_s": 5,
            "models": {"[red]m[/red]": model},
            "providers": {"[p]": {"type": "tei", "endpoint": endpoint}},
            "cache": {"(all models)": {"enabled": True, "redis": "[up]"}, "[c]": {"misses": 1}},
            "[extra]": {"[k]": {"[col]": "[v]"}},
        }
    )
    for shown in (
        "[red]m[/red]",
        "[b]onnx cpu float32",
        "[/x] 2",
        "[p]",
        f"tei {endpoint}",
        "redis [up]",
        "[c]",
        "[extra]",
        "[k]",
        "[col]",
        "[v]",
    ):
        assert shown in text, shown


def test_status_fields_of_another_shape_render_as_blanks() -> None:
    """Inside a status document: a string for a number, a list for a dict. The tables show
    zeros and dashes for them, not a traceback."""
    text = _rendered(
        {
            "version": "0.1.0",
            "ready": True,
            "status": "ready",
            "uptime_s": float("inf"),
            "models": {"m": {"recent": {"inputs_per_s": "fast", "window_s": "1m"}, "errors": []}},
            "oddity": {"uptime": "soon"},
            "providers": {"p": {"health": [], "counters": {"upstream_calls": "x"}, "lanes": 2}},
            "cache": {"(all models)": {"enabled": True, "bytes": "big"}, "c": ["odd"]},
        }
    )
    assert "up 0m 00s" in text
    first_cells = {line.split("│")[1].strip() for line in text.splitlines() if "│" in line}
    assert {"m", "p", "c"} <= first_cells


def test_providers_list_takes_no_proxys_page_or_other_json() -> None:
    """``embedplex providers list`` read the answer as JSON with a ``data`` list whatever it
    was: an HTML 200 was a JSONDecodeError traceback, another server's JSON a KeyError."""
    answers = [
        (lambda _: HTMLResponse(PAGE), "HTTP 200 OK, text/html"),
        (lambda _: JSONResponse({"items": []}), "HTTP 200 OK, application/json"),
    ]
    for answer, line in answers:
        with live_server(answering(answer), wait_ready=False) as url:
            exit_code, out = run_cli("providers", "list", "--server", url)
            assert exit_code == 1, out
            assert out.strip() == f"error: not an embedplex answer ({line})"
