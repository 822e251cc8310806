"""Nothing a client sends becomes a metric label or reaches a log line unescaped.

Label values come only from configured names: a model not served here is ``unknown``, an ad-hoc
route a request makes up is ``unknown``, a path no route has is ``unmatched``. Control characters
(CR, LF, ESC, other C0 and C1, U+2028) are escaped in the pretty and the JSON log formats.
"""

from __future__ import annotations

import logging
import re
import sys

import httpx
import orjson
import pytest

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.observability.logs import (
    _CONTROLS,
    _PRETTY,
    JsonFormatter,
    PrettyFormatter,
    escape_controls,
)
from embedplex.providers.config import RouteConfig
from upstream_fakes import provider, running_upstream

from .conftest import MODEL, Served, parse_metrics

HOSTILE = "evil\r\nINFO fake line \x1b[31mred\x1b[0m \x9b2J \u2028 end\x00"
PRETTY = PrettyFormatter("%(levelname)s %(name)s: %(message)s")


def request_labels(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    """Every value of every label of the request metrics."""
    out = set()
    for (name, labels), _ in samples.items():
        if name.startswith(("embedplex_request", "embedplex_refusals")):
            out |= {v for _, v in labels}
    return out


def assert_clean(line: str) -> None:
    """One line, no control character in it."""
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), repr(line)


async def test_label_values_come_only_from_configured_names(served: Served) -> None:
    client = served.client
    await client.post("/v1/embeddings", json={"input": "x", "model": HOSTILE})  # the one model
    await client.post("/v1/embeddings", json={"input": "x", "providers": [HOSTILE]})
    await client.get("/info", params={"model": HOSTILE})
    await client.post("/%1b%5b2J" + "/x" * 3, json={})
    await client.get("/no-such-" + "a" * 200)
    samples = await served.metrics()
    values = request_labels(samples)
    routes = {dict(labels).get("route") for (name, labels) in samples if "request" in name}
    assert "unmatched" in routes
    assert {
        dict(labels)["model"] for (name, labels) in samples if name == "embedplex_requests_total"
    } == {
        MODEL,
        "unknown",
        "-",
    }
    assert not any("evil" in v or "no-such" in v or "\x1b" in v for v in values), values


async def test_an_ad_hoc_route_is_counted_as_unknown(tmp_path: object) -> None:
    with running_upstream() as upstream:
        settings = Settings(
            local_model=False,
            providers=[provider("p1", upstream)],
            routes=[RouteConfig(model="configured", providers=["p1"])],
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await app.state.loader
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for k in range(3):  # each request names its own route: one label, not three
                    r = await client.post(
                        "/v1/embeddings",
                        json={"input": "x", "model": f"made-up-{k}", "providers": ["p1"]},
                    )
                    assert r.status_code == 200, r.text
                r = await client.post("/v1/embeddings", json={"input": "x", "model": "configured"})
                assert r.status_code == 200
                samples = parse_metrics((await client.get("/metrics")).text)
    models = {
        dict(labels)["model"] for (name, labels) in samples if name == "embedplex_requests_total"
    }
    assert models == {"configured", "unknown"}


async def test_request_lines_escape_what_the_client_sent(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await served.client.post(
        "/embed%0d%0aINFO forged%0a%1b[31m", json={}, headers={"x-request-id": "id\x7f\x1bzz"}
    )
    (record,) = [r for r in caplog.records if r.name == "embedplex.access"]
    pretty = PRETTY.format(record)
    assert_clean(pretty)
    assert "\\n" in pretty and "\\x1b" in pretty  # escaped, not dropped
    line = JsonFormatter().format(record)
    assert_clean(line)
    data = orjson.loads(line)
    assert "\n" in data["message"]  # JSON escapes it; read back, it is what was sent
    # The request id is escaped where it comes in: in the log and echoed back alike.
    assert data["request_id"] == "id\\x7f\\x1bzz"


def test_formatters_escape_messages_arguments_and_tracebacks() -> None:
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "embedplex.test", logging.ERROR, __file__, 1, "bad input %s", (HOSTILE,), exc_info
    )
    record.model = HOSTILE  # an extra field, as the access log has
    pretty = PRETTY.format(record)
    first, *traceback = pretty.split("\n")
    assert_clean(first)
    assert first.startswith("ERROR embedplex.test: bad input evil\\r\\nINFO fake line \\x1b[31m")
    assert "\\x9b2J \\u2028 end\\x00" in first
    for line in traceback:  # the traceback keeps its lines, each indented and escaped
        assert line.startswith("  ")
        assert_clean(line)
    # Its LF stays a line break, but the line it starts is indented: no forged record.
    assert "  ValueError: evil\\r" in traceback
    assert traceback[traceback.index("  ValueError: evil\\r") + 1].startswith("  INFO fake")
    record.exc_text = None
    line = JsonFormatter().format(record)
    assert_clean(line)
    data = orjson.loads(line)
    assert data["model"] == HOSTILE  # escaped in the line, exact once decoded
    assert data["message"] == "bad input " + HOSTILE
    assert escape_controls("tab\there") == "tab\\there"


@pytest.mark.parametrize("code", _CONTROLS)
def test_every_control_character_is_escaped_alone(code: int) -> None:
    """The formatters skip the escaping for a printable line: each control character alone
    must make a line not printable, and come out escaped, in both formats."""
    char = chr(code)
    assert escape_controls(f"a{char}b") == f"a{_PRETTY[code]}b"
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "a%sb", (char,), None)
    record.model = char
    pretty = PRETTY.format(record)
    assert_clean(pretty)
    assert pretty == f"INFO t: a{_PRETTY[code]}b"
    line = JsonFormatter().format(record)
    assert_clean(line)
    data = orjson.loads(line)
    assert (data["message"], data["model"]) == (f"a{char}b", char)
