"""URLs and messages made safe to show: the credentials in them masked.

Standard library only: the hub's download child (``backends/hub.py``) masks every log line it
relays with ``redact_urls``, and importing it from the state store's module took SQLAlchemy
with it (0.25 s of the child's 0.35 s start).

Two rules, for two kinds of URL:

- ``redact_url`` / ``redact_urls``: a connection URL (``state_url``, ``redis_url``,
  ``HF_ENDPOINT``): the userinfo's password and the password query parameters become ``***``;
  the user name, host and database stay, so the message still says where it went.
- ``redact_endpoint`` / ``redact_query``: a provider's endpoint or proxy: the whole userinfo
  and every query value become ``***`` (an API may take its key as ``?key=``).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

MASK = "***"

# Query parameters that carry a password: asyncpg and libpq accept ``?password=`` beside (or
# instead of) the userinfo one, and ``sslpassword`` unlocks the client key.
_SECRET_PARAMS = frozenset({"password", "sslpassword"})

# A URL as messages quote it: up to whitespace, a quote, an angle bracket or a parenthesis.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")


def redact_url(url: str) -> str:
    """``url`` safe to print or log: the userinfo password and every password query parameter
    become ``***``. The one redaction for state_url and redis_url (startup log, ``db upgrade``,
    ``config show``, error messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL at all: nothing in it can be shown safely
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostport}"
    query = "&".join(_redact_param(p) for p in parts.query.split("&"))
    if netloc == parts.netloc and query == parts.query:
        return url
    # Rebuilt by hand: urlunsplit would turn sqlite:///path into sqlite:/path.
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    return rebuilt + (f"#{parts.fragment}" if parts.fragment else "")


def redact_urls(text: str) -> str:
    """``text`` with every URL in it redacted as ``redact_url`` does: for messages that quote
    URLs (a hub error names the ``HF_ENDPOINT`` URL it asked, userinfo and all)."""
    return _URL.sub(lambda m: redact_url(m.group()), text) if "://" in text else text


def _redact_param(pair: str) -> str:
    name, sep, _ = pair.partition("=")
    return f"{name}={MASK}" if sep and unquote(name).lower() in _SECRET_PARAMS else pair


def redact_endpoint(url: str | None) -> str | None:
    """``url`` safe to show: its userinfo (a proxy's ``user:password``) as ``***`` and its
    query's values as ``redact_query`` shows them."""
    if url is None:
        return None
    scheme, sep, rest = url.partition("://")
    if sep:
        end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
        authority = rest[:end]
        if "@" in authority:
            url = f"{scheme}://{MASK}@{authority.rpartition('@')[2]}{rest[end:]}"
    return redact_query(url)


def redact_query(url: str | None) -> str | None:
    """``url`` safe to show: each query value becomes ``***``, its parameter name stays.

    Some APIs take their key in the query (``?key=...``: Gemini, Azure-style), and an
    endpoint is shown in listings, stats and logs. Such endpoints are kept working (the
    URL sent upstream is unchanged) rather than refused; only what is shown is redacted.
    """
    if url is None or "?" not in url:
        return url
    head, _, query = url.partition("?")
    query, hash_, fragment = query.partition("#")
    names = [part.partition("=")[0] for part in query.split("&") if part]
    return f"{head}?{'&'.join(f'{name}={MASK}' for name in names)}{hash_}{fragment}"
