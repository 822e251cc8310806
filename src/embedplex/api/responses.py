"""The JSON answer every route writes: bytes in, raw headers out, nothing in between.

Starlette's ``Response.__init__`` renders its content, then builds the raw header list from a
mapping (lower-casing and encoding each name and value, a list comprehension and a scan for
content-length and content-type). An embed answer is already bytes (orjson) and its headers
are few and known, so ``JsonResponse`` sets the raw headers itself: the same bytes on the wire,
about a third of what building the starlette response cost on every request.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response

_CONTENT_TYPE = (b"content-type", b"application/json")


class JsonResponse(Response):
    """An already-encoded JSON body with ``headers`` (latin-1 values), or with ``raw`` header
    lines (lower-case names; the list is kept, not copied): what the routes' timing headers
    already are (``Timings.headers``)."""

    media_type = "application/json"

    def __init__(
        self,
        body: bytes,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        *,
        raw: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        if raw is None:
            raw = (
                [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
                if headers
                else []
            )
        raw.append((b"content-length", str(len(body)).encode("latin-1")))
        raw.append(_CONTENT_TYPE)
        self.raw_headers = raw
