"""One structured log line per request, request ids, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import orjson
import pytest
from typer.testing import CliRunner

from embedplex.cli.main import app as cli
from embedplex.observability.logs import JsonFormatter, PrettyFormatter

from .conftest import MODEL, Served, eventually, serve, settings

SECRET = "sk-obs-test-0123456789abcdef"


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "embedplex.access"]


async def test_one_structured_line_per_request(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    r = await served.client.post(
        "/v1/embeddings", json={"input": ["one", "two"]}, headers={"x-request-id": "abc-123"}
    )
    assert r.status_code == 200
    await served.client.get("/health/ready")  # probes are not logged
    (record,) = access_records(caplog)
    line = orjson.loads(JsonFormatter().format(record))
    assert list(line) == [  # the fields, in their order (log pipelines may read it)
        *("ts", "level", "logger", "message", "request_id", "method", "route", "status"),
        *("model", "inputs", "tokens", "duration_ms", "tokenization_ms", "queue_ms"),
        *("inference_ms", "error_type", "key_id"),
    ]
    assert line["request_id"] == "abc-123"
    assert line["route"] == "/v1/embeddings"
    assert line["model"] == MODEL
    assert line["inputs"] == 2
    assert line["tokens"] == r.json()["usage"]["prompt_tokens"]
    assert line["status"] == 200
    assert line["error_type"] is None
    assert line["duration_ms"] >= line["inference_ms"] >= 0
    for key in ("tokenization_ms", "queue_ms"):
        assert line[key] >= 0
    assert re.fullmatch(
        rf"POST /v1/embeddings 200 \d+\.\dms model={MODEL} inputs=2 tokens={line['tokens']}"
        r" queue=\d+\.\dms inference=\d+\.\dms id=abc-123",
        line["message"],
    ), line["message"]
    assert record.funcName == "_log" and record.pathname.endswith("observe.py")


async def test_failed_request_line_names_the_error(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert (await served.client.post("/embed", json={"inputs": []})).status_code == 400
    (record,) = access_records(caplog)
    assert record.__dict__["status"] == 400
    assert record.__dict__["error_type"] == "empty"


async def test_request_id_is_echoed_or_generated(served: Served) -> None:
    given = await served.client.post("/embed", json={"inputs": "x"}, headers={"X-Request-ID": "r1"})
    assert given.headers["x-request-id"] == "r1"
    made = await served.client.post("/embed", json={"inputs": "x"})
    rid = made.headers["x-request-id"]
    assert len(rid) == 32
    int(rid, 16)
    other = await served.client.post("/embed", json={"inputs": "x"})
    assert other.headers["x-request-id"] != rid


async def test_log_requests_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serve(settings(log_requests=False)) as srv:
        assert (await srv.client.post("/embed", json={"inputs": "x"})).status_code == 200
    assert not access_records(caplog)


async def test_api_key_never_reaches_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(settings(api_key=SECRET, log_level="debug")) as srv:
        auth = {"authorization": f"Bearer {SECRET}"}
        ok = await srv.client.post("/embed", json={"inputs": "x"}, headers=auth)
        assert ok.status_code == 200
        wrong = await srv.client.post(
            "/embed", json={"inputs": "x"}, headers={"authorization": f"Bearer {SECRET}x"}
        )
        assert wrong.status_code == 401
        status = await srv.client.get("/api/v1/status", headers=auth)
        assert SECRET not in status.text
    records = caplog.records
    assert records, "expected log lines"
    formatter = JsonFormatter()
    text = "\n".join(formatter.format(r) for r in records) + caplog.text
    assert SECRET not in text
    lines = access_records(caplog)
    assert [r.__dict__["status"] for r in lines] == [200, 401]
    assert lines[0].__dict__["key_id"] == "static"
    assert lines[1].__dict__["error_type"] == "authentication"
    assert lines[1].__dict__["route"] == "/embed"  # refused before routing, still labelled


async def test_refused_keys_are_logged_once_a_second_and_paths_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client guessing keys (or misconfigured and retrying) gets every 401, but the log a
    line a second per status, which says how many it left out; a long path is cut."""
    caplog.set_level(logging.INFO)
    async with serve(settings(api_key=SECRET)) as srv:
        for _ in range(20):
            r = await srv.client.post("/embed", json={"inputs": "x"})
            assert r.status_code == 401
        long = await srv.client.post("/embed/" + "a" * 5000, json={"inputs": "x"})
        assert long.status_code == 401
    lines = access_records(caplog)
    refused = [r for r in lines if r.__dict__.get("status") == 401]
    assert 1 <= len(refused) <= 3, [r.getMessage() for r in lines]  # ~1 a second, 21 sent
    logged = "\n".join(r.getMessage() for r in refused)
    assert "a" * 5000 not in logged
    async with serve(settings(api_key=SECRET)) as srv:  # a new observer: its own window
        await srv.client.post("/embed/" + "a" * 5000, json={"inputs": "x"})
    last = access_records(caplog)[-1].getMessage()
    assert "/embed/" + "a" * 249 + "..." in last and "a" * 300 not in last


async def test_refusals_left_out_are_told_when_their_second_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The count of unlogged refusals is written when their window closes, not when (if ever)
    a later refusal comes, and says the interval it covers."""
    caplog.set_level(logging.INFO)
    async with serve(settings(api_key=SECRET)) as srv:
        for _ in range(6):
            assert (await srv.client.post("/embed", json={"inputs": "x"})).status_code == 401
        # Nothing more comes: the first refusal's own line, then, its second over, the count.
        await eventually(lambda: len(access_records(caplog)) == 2, 5)
        await asyncio.sleep(0.2)
        lines = [r.getMessage() for r in access_records(caplog)]
    assert len(lines) == 2, lines
    (told,) = [m for m in lines if "not logged" in m]
    match = re.fullmatch(
        r"5 refusals \(401\) not logged in the (\d\.\d) s after the last one logged", told
    )
    assert match is not None, told
    assert 1.0 <= float(match[1]) < 5


async def test_refusals_left_out_are_told_at_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """A server that stops inside a refusal window still says how many it left out."""
    caplog.set_level(logging.INFO)
    async with serve(settings(api_key=SECRET)) as srv:
        for _ in range(4):
            assert (await srv.client.post("/embed", json={"inputs": "x"})).status_code == 401
    lines = [r.getMessage() for r in access_records(caplog)]
    assert len(lines) == 2, lines
    assert re.fullmatch(
        r"3 refusals \(401\) not logged in the \d\.\d s after the last one logged", lines[1]
    ), lines


async def test_failed_scrapes_and_status_logins_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    auth = {"authorization": f"Bearer {SECRET}"}
    async with serve(settings(api_key=SECRET)) as srv:
        assert (await srv.client.get("/metrics", headers=auth)).status_code == 200
        assert (await srv.client.get("/health/live")).status_code == 200
        assert (await srv.client.get("/metrics")).status_code == 401
        assert (await srv.client.get("/healthz", headers=auth)).status_code == 404
    lines = access_records(caplog)
    assert [(r.__dict__["route"], r.__dict__["status"]) for r in lines] == [
        ("/metrics", 401),
        ("unmatched", 404),
    ]


def test_config_show_redacts_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["config", "show", "--api-key", SECRET])
    assert shown.exit_code == 0, shown.output
    assert SECRET not in shown.output
    assert '"api_key": "***"' in shown.output
    monkeypatch.setenv("EMBEDPLEX_API_KEY", SECRET)
    from_env = runner.invoke(cli, ["config", "show"])
    assert from_env.exit_code == 0
    assert SECRET not in from_env.output


@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005])
def test_line_times_are_each_records_own(created: float) -> None:
    """The formatters keep the last second's text: a record of another second gets its own."""
    pretty = PrettyFormatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    plain = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    json = JsonFormatter()
    for offset in (0.0, 0.5, 1.0, -1.0, 3600.0, 0.0):  # new seconds, back, and again
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", None, None)
        record.created = created + offset
        record.msecs = int((record.created - int(record.created)) * 1000)
        assert pretty.format(record) == plain.format(record)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        assert orjson.loads(json.format(record))["ts"] == f"{ts}.{int(record.msecs):03d}Z"
