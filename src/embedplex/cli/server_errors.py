"""What a running server said when it refused a command's request, for the commands to print.

Admin and TEI routes answer ``{"error": str, "error_type": str}``; OpenAI-style routes
``{"error": {"message": str, ...}}``. A body of neither shape (a proxy's HTML page) gives the
reason phrase instead: the command never prints a raw body or httpx's own text. Callers print
the status code beside it.
"""

from __future__ import annotations

from typing import Any

import httpx


def error_message(response: httpx.Response) -> str:
    """The server's own message for an error response, else its reason phrase."""
    try:
        data: Any = response.json()
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if isinstance(error, str) and error:
        return error
    return response.reason_phrase or "no message"
