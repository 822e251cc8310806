"""schemathesis against the live server's OpenAPI document, with and without secrets.

Every operation the document lists is called with generated requests, schema-valid and not;
each answer must be no 5xx, a documented status, of the documented content type and schema.
Three ways in: no secrets configured; an API key and an admin secret configured and sent; both
configured and nothing sent (401s, documented too). Methods a path does not serve get 405 with
``Allow``. The server is the real one over the fake backend (``fake_server.py``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from procs import FULL, embedplex_serve, fake_server
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from embedplex.api.app import create_app
from embedplex.config import Settings

API_KEY = "reliability-api-key"
ADMIN_SECRET = "reliability-admin-secret"
SECRETS = {"EMBEDPLEX_API_KEY": API_KEY, "EMBEDPLEX_ADMIN_SECRET": ADMIN_SECRET}
MODES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "open": ({}, {}),
    "keyed": (SECRETS, {"Authorization": f"Bearer {API_KEY}", "X-Admin-Secret": ADMIN_SECRET}),
    "unauthenticated": (SECRETS, {}),
}
EXAMPLES = 40 if FULL else 6
# The document as the app writes it (no lifespan needed): the operations to parametrize over.
_DOC = create_app(Settings()).openapi()
OPERATIONS = [(m.upper(), p) for p, item in _DOC["paths"].items() for m in item]
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


# ``make reliability`` adds the real default model behind ``embedplex serve`` itself.
REAL = pytest.param("real-model", marks=[pytest.mark.model, pytest.mark.slow])
PARAMS = [*MODES, REAL] if FULL else list(MODES)


@pytest.fixture(scope="module", params=PARAMS)
def live(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[tuple[Any, Any]]:
    if request.param == "real-model":
        cache = request.getfixturevalue("model_cache")
        with embedplex_serve("--payload-limit", "65536", cache=cache) as srv:
            yield schemathesis.openapi.from_url(srv.url + "/openapi.json"), (srv, {})
        return
    env, headers = MODES[request.param]
    # A small body limit: the generator's large inputs meet it quickly.
    with fake_server(tiny_model_dir, env=env, payload_limit=65536) as srv:
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json"), (srv, headers)


def _fuzz(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not FULL,  # CI sees the same cases every run; the full run explores
        database=None,
    )
    def run(case: Any) -> None:
        # Schema-valid is not always acceptable: token ids outside the vocabulary, dimensions
        # above the model's, inputs past its length are 4xx the schema cannot express.
        case.call_and_validate(
            headers=headers, timeout=30, excluded_checks=[positive_data_acceptance]
        )

    # Unsatisfiable: nothing to vary (no parameters, or none that can be made invalid).
    with contextlib.suppress(Unsatisfiable):
        run()


# Found by this suite, fixed on another branch: the lead removes the entry after the merge.
KNOWN: dict[tuple[str, str, str], str] = {}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_answer_is_documented(
    live: tuple[Any, Any], method: str, path: str, mode: GenerationMode, request: Any
) -> None:
    schema, (_, headers) = live
    known = KNOWN.get((request.node.callspec.id.split("-")[0], method, path))
    if known is not None and mode is GenerationMode.POSITIVE:
        # strict where the cases are fixed (CI); the full run's random cases may miss it
        request.applymarker(pytest.mark.xfail(strict=not FULL, reason=known))
    _fuzz(schema[path][method], mode, headers)


def _templated_route_serves(method: str, path: str) -> bool:
    """Whether a templated path serves ``method`` on ``path`` (``DELETE /api/v1/keys/{name}``
    answers ``DELETE /api/v1/keys/usage``: a key may be named so), so no 405 is due."""
    for template, item in _DOC["paths"].items():
        if "{" in template and method.lower() in item:
            pattern = re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template))
            if re.fullmatch(pattern, path):
                return True
    return False


def test_a_method_a_path_does_not_serve_is_405_with_allow(live: tuple[Any, Any]) -> None:
    _, (srv, headers) = live
    checked = 0
    for path, item in _DOC["paths"].items():
        if "{" in path:
            continue
        for method in METHODS:
            if method.lower() in item or _templated_route_serves(method, path):
                continue
            r = httpx.request(method, srv.url + path, headers=headers, timeout=30)
            if r.status_code == 401:  # unauthenticated mode: the key is checked first
                continue
            assert r.status_code == 405, (method, path, r.status_code, r.text)
            allowed = {m.strip() for m in r.headers["allow"].split(",")}
            assert {m.upper() for m in item} <= allowed, (method, path, allowed)
            assert r.headers["content-type"] == "application/json"
            checked += 1
    assert checked > 0 or headers == {}
