"""The server's cache and dedupe counters, read from ``/metrics`` before and after a run.

Only what the cache benchmark reports is read; every sample of a name is summed over its
labels (models, tiers). A server without these metrics (another server, an older embedplex, one
whose ``/metrics`` needs a key it was not given) reads as nothing, and the report shows ``-``.
"""

from __future__ import annotations

import math
import urllib.request
from urllib.parse import urlsplit

HITS = "embedplex_cache_hits_total"
MISSES = "embedplex_cache_misses_total"
EVICTIONS = "embedplex_cache_evictions_total"
JOINED = "embedplex_dedupe_joined_total"
COUNTERS = (HITS, MISSES, EVICTIONS, JOINED)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server, no proxy


def parse(text: str, names: tuple[str, ...] = COUNTERS) -> dict[str, float]:
    """Prometheus text format: the sum over label sets of each of ``names`` present."""
    wanted = set(names)
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        if name not in wanted:
            continue
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            found[name] = found.get(name, 0.0) + value
    return found


def scrape(url: str, *, api_key: str | None = None, timeout: float = 5.0) -> dict[str, float]:
    """The counters of the server at ``url`` (its path is ignored); empty when it has none.

    urllib, not httpx: a new httpx client builds a TLS context (~0.3 s here) even for http.
    """
    parts = urlsplit(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"http://{parts.netloc}/metrics", headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError):  # refused, timed out, HTTP errors (401, 404), bad URL
        return {}
    return parse(text)


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the run added to each counter read both times (a restart would read negative)."""
    return {name: after[name] - before[name] for name in after if name in before}
