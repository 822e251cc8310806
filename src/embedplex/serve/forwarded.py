"""``X-Forwarded-For`` and ``X-Forwarded-Proto`` from a trusted proxy, as uvicorn reads them,
without uvicorn's ASGI layer around every request.

uvicorn wraps the app in ``ProxyHeadersMiddleware`` (``proxy_headers``, on by default, trusting
``forwarded_allow_ips``: ``$FORWARDED_ALLOW_IPS``, by default 127.0.0.1 and ::1): one more
coroutine frame that every request enters and resumes, and a scan of its headers, though nearly
no request carries either header. Here the server runs with ``proxy_headers=False`` and the
connection applies the same middleware to a request's scope itself, only when the request has
one of the two headers: uvicorn's own code decides what the client and scheme become, and the
middleware's app does nothing, so its coroutine ends without waiting and is run to its end at
once.
"""

from __future__ import annotations

from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto")


async def _rewritten(scope: Any, receive: Any, send: Any) -> None:
    """The middleware's app: the scope is rewritten by the time it is called."""


_never: Any = None  # its receive and send: never called


class ForwardedHeaders:
    """uvicorn's proxy-header rewrite of a scope, trusting ``trusted_hosts``."""

    __slots__ = ("_rewrite",)

    def __init__(self, trusted_hosts: list[str] | str) -> None:
        self._rewrite = ProxyHeadersMiddleware(_rewritten, trusted_hosts=trusted_hosts)

    def apply(self, scope: Any) -> None:
        """Rewrite ``scope``'s client and scheme as uvicorn would (header names lower case)."""
        for name, _ in scope["headers"]:
            if name in _FORWARDED:
                break
        else:
            return
        step = self._rewrite(scope, _never, _never)
        try:
            step.send(None)
        except StopIteration:
            return
        step.close()  # (cannot happen: neither it nor its app waits for anything)
        raise RuntimeError("the proxy-header rewrite waited")
