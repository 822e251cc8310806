"""The API documentation pages, /docs (Swagger UI) and /redoc, whole from this process.

FastAPI's own pages load Swagger UI's and ReDoc's scripts, styles and favicon from a CDN, and
ReDoc its fonts from Google: on a site with no way out they were blank. Here the pages are
FastAPI's, pointed at the copies the ``fastapi-offline`` package ships, served under
``ASSETS``. Being under /docs, they are what /docs is: open without a key (``api/stages.py``
matches open paths by prefix), and absent with ``docs_enabled = false`` (``create_app`` adds
none of this then).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

OPENAPI_URL, DOCS, REDOC = "/openapi.json", "/docs", "/redoc"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
ASSETS = "/docs/assets"
_ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# Every path a docs page loads: neither counted, traced nor logged (api/observe.py).
DOC_PATHS = frozenset(
    {OPENAPI_URL, DOCS, REDOC, OAUTH2_REDIRECT, *(f"{ASSETS}/{name}" for name in _ASSET_FILES)}
)
# Swagger UI 5 and ReDoc 2: Swagger UI 4 (what swagger-ui-bundle ships) renders no OpenAPI
# 3.1 document, which is what FastAPI writes.
_FILES = Path(fastapi_offline.__file__).parent / "static"


def add_docs(app: FastAPI, openapi_url: str) -> None:
    """Serve /docs, its OAuth2 redirect, /redoc and their assets on ``app``."""
    app.mount(ASSETS, StaticFiles(directory=_FILES), name="docs-assets")

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = base(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    async def oauth2_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = base(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route(DOCS, swagger_ui, include_in_schema=False)
    app.add_route(OAUTH2_REDIRECT, oauth2_redirect, include_in_schema=False)
    app.add_route(REDOC, redoc, include_in_schema=False)
