"""/docs and /redoc load nothing from outside the process: on an air-gapped site FastAPI's own
pages, whose scripts come from a CDN, were blank."""

from __future__ import annotations

import re
from typing import Any

import pytest
from test_pipeline import serve

from embedplex.config import Settings

KEY = "sk-docs-offline-key"
AUTH = {"authorization": f"Bearer {KEY}"}
# Any absolute URL in an attribute or a script's string: src=, href=, url: '...'.
EXTERNAL = re.compile(r"""["'(]\s*(?:https?:)?//""")


def settings(**kw: Any) -> Settings:
    return Settings.load(None, served_model_name="embedder", **kw)


def local_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png"}),
    ],
)
async def test_the_docs_pages_and_every_asset_they_name_come_from_the_process(
    page: str, assets: set[str]
) -> None:
    async with serve(settings(api_key=KEY)) as (_, client):  # open without the key
        html = await client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assert not EXTERNAL.search(html.text), EXTERNAL.search(html.text)
        urls = local_urls(html.text)
        named = {url.rsplit("/", 1)[-1] for url in urls if url.startswith("/docs/assets/")}
        assert named == assets, urls
        assert "/openapi.json" in urls
        for url in urls:
            answer = await client.get(url)
            assert answer.status_code == 200, url
            assert len(answer.content) > 1000, url  # the file itself, not an error page
        script = await client.get(next(u for u in urls if u.endswith(".js")))
        assert "javascript" in script.headers["content-type"]


async def test_swagger_ui_is_one_that_renders_openapi_3_1() -> None:
    """FastAPI writes OpenAPI 3.1; Swagger UI 4 (swagger-ui-bundle's) says it cannot render
    it. The shipped bundle knows 3.1 documents."""
    async with serve(settings()) as (_, client):
        version = (await client.get("/openapi.json")).json()["openapi"]
        bundle = (await client.get("/docs/assets/swagger-ui-bundle.js")).text
    assert version.startswith("3.1")
    assert "isOAS31" in bundle


@pytest.mark.parametrize("key", [None, KEY])
async def test_with_docs_off_the_assets_are_gone_too(key: str | None) -> None:
    async with serve(settings(docs_enabled=False, api_key=key)) as (_, client):
        for path in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/favicon.png"):
            assert (await client.get(path, headers=AUTH)).status_code == 404, path
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json"):
            assert (await client.get(path, headers=AUTH)).status_code == 404, path


async def test_an_asset_path_outside_the_folder_is_refused() -> None:
    async with serve(settings()) as (_, client):
        for path in ("/docs/assets/../../../etc/passwd", "/docs/assets/%2e%2e/core.py"):
            assert (await client.get(path)).status_code == 404, path


async def test_reading_the_docs_is_not_counted_as_api_traffic() -> None:
    """As /docs itself: a page's scripts are no requests to count, trace or log."""
    async with serve(settings()) as (_, client):
        html = (await client.get("/docs")).text
        for url in local_urls(html):
            assert (await client.get(url)).status_code == 200, url
        assert (await client.get("/redoc")).status_code == 200
        assert (await client.get("/docs/assets/redoc.standalone.js")).status_code == 200
        scrape = (await client.get("/metrics")).text
    counted = [line for line in scrape.splitlines() if line.startswith("embedplex_requests_total")]
    assert counted == [], counted
