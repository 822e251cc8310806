"""The router's HTTP wire: an httpx transport whose connections and parsing are aiohttp's.

Why: the router's calls carry a batch each way (a 64-text call answers ~140 kB), and httpcore's
pure-Python HTTP/1.1 (h11, anyio streams) cost about three times aiohttp's C parser per call in
CPU (docs/router.md, "Router CPU per request"). Only the wire changes: the adapters, retries
and tests keep speaking httpx (``httpx.AsyncClient`` over this ``AsyncBaseTransport``), and
aiohttp's failures come out as the httpx errors they mean (``raise ... from exc``), so
``providers/http.py`` classifies them as before.

The endpoint guard (``endpoints.py``) holds here as on httpcore: every connection resolves its
host through ``GuardedResolver``, which checks every address and hands aiohttp only checked
ones (no DNS cache, so each new connection is checked again); aiohttp does not resolve IP
literals, so those are checked before the request is sent.
"""

from __future__ import annotations

import errno
import socket
import ssl

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from embedplex.providers import endpoints


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, returning only addresses ``backend``'s rules allow.

    A refusal is an ``OSError``, which aiohttp reports as a connect error that gives its reason.
    """

    def __init__(self, backend: endpoints.GuardedBackend) -> None:
        self.backend = backend

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await endpoints.resolve(host, port)
            self.backend._check(host, addresses)
        except endpoints.EndpointRefused as exc:
            # (errno, text): aiohttp's connect error shows the text (its strerror).
            raise OSError(errno.EACCES, f"{host}: {exc}") from None
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        """Nothing to release: lookups go through ``endpoints.resolve``."""


def _timeout(request: httpx.Request) -> aiohttp.ClientTimeout:
    """httpx's per-request timeouts (``extensions["timeout"]``) as aiohttp's."""
    t: dict[str, float | None] = request.extensions.get("timeout", {})
    return aiohttp.ClientTimeout(
        total=None, connect=t.get("pool"), sock_connect=t.get("connect"), sock_read=t.get("read")
    )


class AiohttpTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncBaseTransport`` over one aiohttp session (made on first use, in the loop).

    Bodies are read whole (the router's calls are small JSON documents) and handed to httpx
    undecoded: httpx undoes any content-encoding, as over its own transport.
    """

    def __init__(
        self,
        backend: endpoints.GuardedBackend,
        *,
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.backend = backend
        self.limits = limits
        self.ssl_context = ssl_context or httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry or 5.0,
            resolver=GuardedResolver(self.backend),
            use_dns_cache=False,  # every new connection is checked again (DNS rebinding)
            ssl=self.ssl_context,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            trust_env=False,  # a proxy from the environment would connect past the guard
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        return self._session

    def _check_literal(self, host: str) -> None:
        literal = endpoints.literal_address(host)
        if literal is None:
            return  # a name: GuardedResolver checks it at connect
        try:
            self.backend._check(host, [literal])
        except endpoints.EndpointRefused as exc:
            raise httpx.ConnectError(f"{host}: {exc}") from None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"an upstream is reached over http(s), not {url}")
        self._check_literal(url.host)
        body = await request.aread()
        headers: list[tuple[str, str]] = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
        ]
        try:
            async with session.request(
                request.method,
                str(url),
                data=body or None,
                headers=headers,
                timeout=_timeout(request),
                allow_redirects=False,
                compress=None,
            ) as response:
                content = await response.read()
                return httpx.Response(
                    response.status,
                    headers=[
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers
                    ],
                    content=content,
                    extensions={"reason_phrase": (response.reason or "").encode("latin-1")},
                    request=request,
                )
        except aiohttp.ClientError as exc:
            raise _translate(exc) from exc
        except TimeoutError as exc:  # a total timeout: never set (httpx has none)
            raise httpx.ReadTimeout(str(exc) or "timed out") from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _translate(exc: aiohttp.ClientError) -> httpx.TransportError:
    """An aiohttp failure as the httpx error it means."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(text)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(text)
    if isinstance(exc, aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(text)  # a response aiohttp could not read
    if isinstance(exc, aiohttp.ClientOSError | aiohttp.ClientConnectionError):
        return httpx.ReadError(text)
    return httpx.NetworkError(text)


def wire_client(
    backend: endpoints.GuardedBackend, *, limits: httpx.Limits, timeout: httpx.Timeout
) -> httpx.AsyncClient:
    """The router's pooled client: httpx's API over ``AiohttpTransport``."""
    transport = AiohttpTransport(backend, limits=limits)
    return httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)
