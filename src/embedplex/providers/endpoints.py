"""Which addresses an upstream endpoint may have: the guard against server-side request forgery.

A provider added at run time (admin API, ``embedplex providers add``) makes this server send
requests, perhaps with an API key, to a URL an admin client chose. So its endpoint must be an
absolute ``http``/``https`` URL whose host, and every address that host resolves to, is public,
or inside a network the operator listed (``provider_allowed_networks``). Cloud metadata addresses
(``169.254.169.254`` and its kin) are never allowed, whatever the lists say: they hand out the
machine's own credentials.

Providers from the config file are the operator's own and may point anywhere (a TEI sidecar on
``127.0.0.1`` is the usual case) except at a metadata address given literally. Only they may go
through an HTTP proxy (``proxy``): the router then connects to the proxy, whose host is checked
as theirs are, and the upstream's name is resolved by the proxy, past these rules.

DNS rebinding: a name that resolves to a public address when the provider is added and to a
private one later is caught at connect time. ``GuardedBackend`` holds the rules (the full rule
for hosts that no config-file provider names, the metadata rule for those that one does); the
router's wire (``wire.py``) resolves every new connection's host through it, checks every
address and connects to a checked address, never to a second resolution of the name. As an
httpcore network backend it guards an httpx client the same way. TLS still verifies the name.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

# Where they lived first (imported from here still): core/redact.py holds them now.
from embedplex.core.redact import redact_endpoint as redact_endpoint
from embedplex.core.redact import redact_query as redact_query

redact_url = redact_endpoint

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services: AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle (IPv4), AWS
# (IPv6), AWS ECS task credentials, Alibaba Cloud.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
RESOLVE_TIMEOUT_S = 5.0


class EndpointRefused(ValueError):
    """The endpoint may not be used; the message says why (safe to show the admin client)."""


def _embedded_v4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (``::ffff:a.b.c.d``, NAT64), else the address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_metadata(address: IPAddress) -> bool:
    return _embedded_v4(address) in METADATA_ADDRESSES


def check_address(address: IPAddress, allowed: Iterable[Network]) -> None:
    """Raise ``EndpointRefused`` unless ``address`` is public or inside ``allowed``."""
    plain = _embedded_v4(address)
    if plain in METADATA_ADDRESSES:
        raise EndpointRefused(f"{address} is a cloud metadata address, never an upstream")
    if plain.is_global and not plain.is_multicast:
        return
    if any(plain in net or address in net for net in allowed):
        return
    raise EndpointRefused(
        f"{address} is not a public address (loopback, private, link-local or reserved); "
        "the server's provider_allowed_networks setting must list its network"
    )


def parse_networks(networks: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(n, strict=False) for n in networks]


def _http_url(url: str, what: str) -> httpx.URL:
    """``url`` parsed, if it is an absolute http(s) URL (``EndpointRefused`` otherwise, naming
    ``what``, never the URL: a malformed one may still carry a key or a password, and this
    reaches logs)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise EndpointRefused(f"the {what} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise EndpointRefused(f"the {what} must be an absolute http:// or https:// URL")
    return parsed


def _host_port(parsed: httpx.URL) -> tuple[str, int]:
    return parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)


def url_host(url: str) -> tuple[str, int]:
    """The host and port of an absolute http(s) URL (``EndpointRefused`` if it is not one)."""
    parsed = _http_url(url, "endpoint")
    if parsed.userinfo:
        raise EndpointRefused("an endpoint carries no credentials (use api_key_env)")
    return _host_port(parsed)


def proxy_host(url: str) -> tuple[str, int]:
    """The host and port of a proxy URL, ``http(s)://[user:password@]host[:port]``
    (``EndpointRefused`` if it is not one)."""
    parsed = _http_url(url, "proxy")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise EndpointRefused("a proxy URL is scheme://[user:password@]host[:port], no more")
    return _host_port(parsed)


def url_credentials(url: str | None) -> list[str]:
    """The credentials in ``url``'s userinfo as they may show up in a text: the password (the
    user name where there is none: a token), both as written and decoded, and the
    ``Proxy-Authorization`` value made of them (a proxy may echo it)."""
    if url is None or "@" not in url:
        return []
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return []
    user, password = parsed.username, parsed.password
    raw = parsed.userinfo.decode("ascii", "replace")
    secret = password or user
    if not secret:
        return []
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    found = {secret, raw, raw.rpartition(":")[2], token, f"Basic {token}"}
    return [s for s in found if s]


def redact_provider(dumped: dict[str, Any]) -> dict[str, Any]:
    """A provider config's ``model_dump`` with its endpoints' query values and its proxy's
    credentials redacted."""
    for key in ("endpoint", "rerank_endpoint", "proxy"):
        dumped[key] = redact_endpoint(dumped.get(key))
    return dumped


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal: itself)."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        raise EndpointRefused(f"cannot resolve {host!r}") from exc
    # sockaddr[0] is the address text; an IPv6 one may carry a %scope suffix.
    return list(
        dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
    )


async def check_endpoint(url: str, allowed: Iterable[Network]) -> None:
    """Refuse ``url`` unless it is http(s) and every address of its host may be reached."""
    host, port = url_host(url)
    addresses = await resolve(host, port)
    if not addresses:
        raise EndpointRefused(f"{host!r} resolves to no address")
    networks = list(allowed)
    for address in addresses:
        try:
            check_address(address, networks)
        except EndpointRefused as exc:
            raise EndpointRefused(f"endpoint host {host!r}: {exc}") from None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the rules allow.

    ``trusted``: hosts the operator configured (config-file providers): only the metadata rule.
    Any other host (a provider added at run time): ``check_address`` with ``allowed``. A refusal
    is a connect error, which the provider's retries and breaker treat as any other.
    """

    def __init__(self, allowed: Iterable[Network], trusted: Iterable[str] = ()) -> None:
        self.allowed = list(allowed)
        self.trusted = frozenset(trusted)
        self._inner = httpcore.AnyIOBackend()

    def _check(self, host: str, addresses: list[IPAddress]) -> None:
        if not addresses:
            raise EndpointRefused(f"{host!r} resolves to no address")
        for address in addresses:
            if host in self.trusted:
                if is_metadata(address):
                    raise EndpointRefused(f"{address} is a cloud metadata address")
            else:
                check_address(address, self.allowed)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await resolve(host, port)
            self._check(host, addresses)
        except EndpointRefused as exc:
            raise httpcore.ConnectError(f"{host}: {exc}") from None
        failure: Exception | None = None
        for address in addresses:  # the checked addresses themselves: no second lookup
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("an upstream is reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_client(
    backend: GuardedBackend, *, limits: httpx.Limits, timeout: httpx.Timeout
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose connections go through ``backend``.

    httpx takes no network backend, so its transport's connection pool is replaced by one that
    has ours (the pool is httpx's documented extension point, ``httpcore``).
    """
    transport = httpx.AsyncHTTPTransport(limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    # trust_env off: a proxy from the environment would connect past the guard.
    return httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)
