"""What a running server said to a command: its refusal's message, or its JSON document.

Admin and TEI routes answer errors as ``{"error": str, "error_type": str}``; OpenAI-style
routes ``{"error": {"message": str, ...}}``. A body of neither shape (a proxy's HTML page) gives
the reason phrase instead: the command never prints a raw body or httpx's own text. Callers
print the status code beside it. An answer the command reads (``json_document``) that is no
JSON object of the expected shape is ``NotEmbedplexAnswer``: a proxy's page, another server.
"""

from __future__ import annotations

from typing import Any

import httpx


class NotEmbedplexAnswer(Exception):
    """The answer is no embedplex JSON document; the text names its status line, never its
    body: ``not an embedplex answer (HTTP 502 Bad Gateway, text/html)``."""

    def __init__(self, response: httpx.Response) -> None:
        self.url = str(response.url)
        media = response.headers.get("content-type", "").split(";")[0].strip()
        line = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        super().__init__(f"not an embedplex answer ({line}{', ' + media if media else ''})")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return None


def json_document(response: httpx.Response, **shape: type) -> dict[str, Any]:
    """The response's JSON object, each key of ``shape`` holding a value of its type; else
    ``NotEmbedplexAnswer``."""
    data = _json(response)
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), kind) for key, kind in shape.items()
    ):
        raise NotEmbedplexAnswer(response)
    return data


def error_message(response: httpx.Response) -> str:
    """The server's own message for an error response, else its reason phrase."""
    data = _json(response)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if isinstance(error, str) and error:
        return error
    return response.reason_phrase or "no message"
