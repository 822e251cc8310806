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

A provider of the config file may go through an HTTP proxy (``Proxy``: a client of its own,
each request sent with aiohttp's ``proxy``; https upstreams through ``CONNECT``, aiohttp's).
The guard then checks the proxy's addresses, the ones connected to; the upstream's name is
resolved by the proxy, past the guard (docs/security.md), which is why a provider added at run
time may not name one. Proxy variables in the environment are ignored (``trust_env=False``).

What comes back is bounded: a body is read up to its caller's cap (a provider's
``max_response_bytes``; an error answer's a few KiB), calls ask for ``identity`` (an upstream
that compresses anyway is inflated under the same cap), and a failure's text never holds the
URL, whose query may carry a key (``?key=``: Gemini, Azure).
"""

from __future__ import annotations

import errno
import socket
import ssl
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from embedplex.providers import endpoints
from embedplex.providers.config import MAX_RESPONSE_BYTES

# The most of an error answer's body that is read: its reason is cut to a few hundred
# characters anyway (``http.sanitize``), and a 429 or 5xx is no reason to hold megabytes.
ERROR_BODY_MAX = 8 * 1024
# What a call asks for: no compression. Compressed vectors are barely smaller, and an answer
# would be unpacked in one piece on the event loop, where a few MB of gzip can unpack to GBs.
IDENTITY = ("Accept-Encoding", "identity")
_ENCODED = frozenset({b"content-encoding", b"content-length"})  # dropped once unpacked here


class OversizedAnswer(httpx.DecodingError):
    """An answer whose body (or what its Content-Encoding unpacks to) passes its cap: a
    malformed answer, never read further; its connection is closed, not reused."""

    def __init__(self, status: int, cap: int) -> None:
        super().__init__(f"an answer over {cap} bytes (max_response_bytes)")
        self.status = status


class UnreadableAnswer(httpx.DecodingError):
    """A 2xx answer in gzip or deflate that does not unpack."""

    def __init__(self, status: int, coding: str) -> None:
        super().__init__(f"an answer in Content-Encoding {coding[:40]!r} that was not unpacked")
        self.status = status


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy as aiohttp takes it: its URL without credentials (aiohttp's texts may
    show it), and the credentials as ``Proxy-Authorization`` (``proxy_auth``)."""

    url: str
    auth: aiohttp.BasicAuth | None = None

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """``url``: ``http(s)://[user:password@]host[:port]`` (``ProviderConfig`` checked it);
        percent-escapes in its credentials are undone."""
        parsed = httpx.URL(url)
        auth = None
        if parsed.userinfo:
            auth = aiohttp.BasicAuth(parsed.username, parsed.password, encoding="utf-8")
        return cls(str(parsed.copy_with(username=None, password=None)), auth)

    def request_options(self) -> dict[str, Any]:
        return {"proxy": self.url, "proxy_auth": self.auth}


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

    Bodies are read whole up to a cap (``send``): ``max_response_bytes`` for calls through the
    httpx API, the caller's own for ``WireClient.post_bytes``.
    """

    def __init__(
        self,
        backend: endpoints.GuardedBackend,
        *,
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        proxy: Proxy | None = None,
    ) -> None:
        self.backend = backend
        self.limits = limits
        self.ssl_context = ssl_context or httpx.create_ssl_context()
        self.max_response_bytes = max_response_bytes
        self.proxy = proxy
        # What every request adds (a proxy's URL and credentials), worked out once.
        self._via: dict[str, Any] = proxy.request_options() if proxy is not None else {}
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
            # Cookies are httpx's to keep (its jar, on the httpx API): a second jar here would
            # send them twice, and ``post_bytes`` keeps none (see ``WireClient``).
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        return self._session

    def _check_literal(self, host: str) -> None:
        literal = endpoints.literal_address(host)
        if literal is None:
            return  # a name: GuardedResolver checks it at connect
        self._check_address(host, literal)

    def _check_address(self, host: str, literal: endpoints.IPAddress) -> None:
        try:
            self.backend._check(host, [literal])
        except endpoints.EndpointRefused as exc:
            raise httpx.ConnectError(f"{host}: {exc}") from None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise _unsupported(url.scheme)
        self._check_literal(url.host)
        body = await request.aread()
        headers: list[tuple[str, str]] = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() != b"accept-encoding"
        ]
        headers.append(IDENTITY)
        return await self.send(
            request.method,
            str(url),
            body,
            headers,
            _timeout(request),
            self.max_response_bytes,
            request=request,
        )

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: list[tuple[str, str]],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's, per request)
        max_bytes: int,
        *,
        request: httpx.Request | None = None,
    ) -> httpx.Response:
        """One exchange on the pool, its failures as httpx errors (the URL already checked).

        A 2xx body past ``max_bytes`` is an ``OversizedAnswer``; any other status's body is
        cut at ``ERROR_BODY_MAX`` (its reason is all that is read from it).
        """
        session = self._session or self._open()
        try:
            async with session.request(
                method,
                url,
                data=body or None,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                compress=None,
                **self._via,
            ) as response:
                status = response.status
                ok = 200 <= status < 300
                cap = max_bytes if ok else min(max_bytes, ERROR_BODY_MAX)
                length = response.content_length
                if length is not None and length <= cap:  # the usual answer: as without a cap
                    content = await response.read()
                else:
                    content = await _read(response, cap, cut=not ok)
                raw = response.raw_headers
                coding = response.headers.get("Content-Encoding")
                if coding is not None and coding.strip().lower() != "identity":
                    # Unpacked here, or taken as it is: either way no layer above unpacks it.
                    content = _inflate(response, content, coding, cap, cut=not ok)
                    raw = tuple(h for h in raw if h[0].lower() not in _ENCODED)
                return httpx.Response(
                    status,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw],
                    content=content,
                    extensions={"reason_phrase": (response.reason or "").encode("latin-1")},
                    request=request,
                )
        except aiohttp.ClientError as exc:
            # Not chained: aiohttp's own text holds the URL (a key in its query: ``_translate``).
            raise _translate(exc) from None
        except TimeoutError:  # the total timeout (``post_bytes``: the attempt's limit)
            raise httpx.ReadTimeout("no answer within the attempt's time limit") from None

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


async def _read(response: aiohttp.ClientResponse, cap: int, *, cut: bool) -> bytes:
    """The body of a ``response`` that declares no length, or one past ``cap``: at most
    ``cap`` bytes of it. Past the cap, the first ``cap`` bytes (``cut``) or an
    ``OversizedAnswer``; either way the connection is closed (its rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    if response.content_length is None or cut:  # count it as it comes
        stream = response.content
        while size <= cap:
            chunk = await stream.readany()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
    response.close()
    if cut:
        return b"".join(chunks)[:cap]
    chunks.clear()  # not kept alive by the error's traceback (this frame) until it goes
    raise OversizedAnswer(response.status, cap)


def _inflate(
    response: aiohttp.ClientResponse, body: bytes, coding: str, cap: int, *, cut: bool
) -> bytes:
    """``body`` unpacked, at most ``cap`` bytes of it (past it as ``_read``): gzip and
    deflate, for an upstream that compresses although ``identity`` was asked for. Any other
    coding is taken for identity, as httpx did: the body as it came (already under the cap),
    for the JSON parse to judge. Upstreams send bogus names ("none", "UTF-8"), and one that
    really sent br (a CDN ignoring ``identity``) fails that parse, a malformed answer as any."""
    name = coding.strip().lower()
    tries = {"gzip": [31], "x-gzip": [31], "deflate": [15, -15]}.get(name)
    if tries is None:
        return body
    out = None
    for wbits in tries:  # deflate: zlib-wrapped as the RFC says, or raw as some servers send
        try:
            out = zlib.decompressobj(wbits).decompress(body, cap + 1)
            break
        except zlib.error:
            continue
    if out is None:
        if cut:  # an error answer: its status says enough without its reason
            return b""
        raise UnreadableAnswer(response.status, coding)
    if len(out) <= cap:
        return out
    if cut:
        return out[:cap]
    del out  # as in ``_read``
    raise OversizedAnswer(response.status, cap)


def _unsupported(scheme: str) -> httpx.UnsupportedProtocol:
    # The scheme, not the URL: its query may hold a key.
    return httpx.UnsupportedProtocol(f"an upstream is reached over http(s), not {scheme[:20]!r}")


def _translate(exc: aiohttp.ClientError) -> httpx.TransportError:
    """An aiohttp failure as the httpx error it means: its type and ``_reason``."""
    text = f"{type(exc).__name__}: {_reason(exc)}"
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


def _reason(exc: aiohttp.ClientError) -> str:
    """Why ``exc`` happened, from its fields, never its text: aiohttp writes the request's URL
    into several of its errors (a parse error, a connect timeout), query and key included.

    What the upstream sent may still be in it (a parser's quote of a bad header line): the
    caller (``http.sanitize``) takes our secrets out of that.
    """
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Host and port, not the URL; the guard's refusal is the OS error's text (its reason).
        why = exc.os_error.strerror or type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {why}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"unreadable answer: {exc.message}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer's body broke off or was malformed"
    if isinstance(exc, aiohttp.ClientOSError) and exc.strerror:
        return str(exc.strerror)
    return "connection failed"


class _Target(NamedTuple):
    """What ``WireClient.post_bytes`` sends to one URL before the caller's own headers."""

    url: str  # as httpx writes it (the URL the httpx API would have sent to)
    host: str
    literal: endpoints.IPAddress | None  # the host, when it is an IP literal
    headers: list[tuple[str, str]]  # Host and the client's defaults, as httpx writes them


# URLs a client keeps targets for (one or two a provider); past this the table starts again.
_TARGETS_MAX = 64


class WireClient(httpx.AsyncClient):
    """httpx's API over ``AiohttpTransport``, plus ``post_bytes``: the router's upstream POST.

    Why: every upstream call through ``AsyncClient.post`` went through httpx's client layers
    (request building and URL parsing, auth, redirects, cookies, the timeout extension) only to
    be taken apart again by the transport. ``post_bytes`` sends the same request line and headers
    (the URL's part worked out once by httpx itself; the caller's headers, which carry the API
    key, are not kept) straight to the transport, with the same endpoint check, timeouts and
    error mapping. It keeps no cookie jar: upstream APIs are stateless, and one jar for every
    tenant's calls was never wanted.
    """

    def __init__(self, transport: AiohttpTransport, *, timeout: httpx.Timeout) -> None:
        super().__init__(transport=transport, timeout=timeout, trust_env=False)
        self.wire = transport
        self._targets: dict[str, _Target] = {}

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            request = self.build_request("POST", url)
            parsed = request.url
            if parsed.scheme not in ("http", "https"):
                raise _unsupported(parsed.scheme)
            raw = [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in request.headers.raw
                # the body's own length, set per call; the encoding: ``IDENTITY``
                if k.lower() not in (b"content-length", b"accept-encoding")
            ]
            raw.append(IDENTITY)
            target = _Target(str(parsed), parsed.host, endpoints.literal_address(parsed.host), raw)
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def post_bytes(
        self,
        url: str,
        content: bytes,
        headers: dict[str, str],
        timeout: float,  # noqa: ASYNC109 (each attempt's own limit, as httpx's ``timeout=``)
        max_bytes: int = MAX_RESPONSE_BYTES,
    ) -> httpx.Response:
        """``post(url, content=content, headers=headers, timeout=timeout)``, minus the layers;
        a 2xx body past ``max_bytes`` is an ``OversizedAnswer`` (``AiohttpTransport.send``)."""
        target = self._target(url)
        if target.literal is not None:
            self.wire._check_address(target.host, target.literal)
        # ``total`` bounds the whole exchange, body included: ``sock_read`` alone restarts
        # with every chunk, so an upstream trickling a byte at a time never timed out.
        limit = aiohttp.ClientTimeout(
            total=timeout, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        # The caller's headers replace the client's of the same name, as httpx merges them.
        names = {name.lower() for name in headers}
        sent = [h for h in target.headers if h[0].lower() not in names]
        sent += headers.items()
        sent.append(("Content-Length", str(len(content))))
        return await self.wire.send("POST", target.url, content, sent, limit, max_bytes)


def wire_client(
    backend: endpoints.GuardedBackend,
    *,
    limits: httpx.Limits,
    timeout: httpx.Timeout,
    proxy: Proxy | None = None,
) -> WireClient:
    """The router's pooled client: httpx's API over ``AiohttpTransport`` (through ``proxy``)."""
    return WireClient(AiohttpTransport(backend, limits=limits, proxy=proxy), timeout=timeout)
