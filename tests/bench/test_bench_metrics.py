"""Reading the server's cache and dedupe counters from /metrics, and living without them."""

from __future__ import annotations

import socket
from typing import Any

from embedplex.bench import metrics

TEXT = """\
# HELP embedplex_cache_hits_total Inputs answered by the cache.
# TYPE embedplex_cache_hits_total counter
embedplex_cache_hits_total{model="a",tier="memory"} 7.0
embedplex_cache_hits_total{model="b",tier="redis"} 3.0
embedplex_cache_hits_created{model="a",tier="memory"} 1.764e+09
embedplex_cache_misses_total{model="a"} 5
embedplex_cache_bytes 1048576.0
embedplex_dedupe_joined_total{model="a",note="a } in a label"} 2.0
embedplex_requests_total{route="/v1/embeddings"} 99.0
embedplex_cache_evictions_total NaN
"""


def test_counters_are_summed_over_labels() -> None:
    assert metrics.parse(TEXT) == {
        metrics.HITS: 10.0,
        metrics.MISSES: 5.0,
        metrics.JOINED: 2.0,
    }


def test_delta_keeps_counters_read_both_times() -> None:
    before = {metrics.HITS: 10.0, metrics.MISSES: 5.0}
    after = {metrics.HITS: 25.0, metrics.MISSES: 6.0, metrics.JOINED: 4.0}
    assert metrics.delta(before, after) == {metrics.HITS: 15.0, metrics.MISSES: 1.0}
    assert metrics.delta({}, after) == {}


def test_scrape_reads_the_origin_of_a_url_with_a_path(recording: Any) -> None:
    with recording() as srv:
        srv._record(b'{"input": ["x", "x", "y"]}')
        assert metrics.scrape(srv.url + "/v1/embeddings") == {
            metrics.HITS: 1.0,
            metrics.MISSES: 2.0,
            metrics.JOINED: 0.0,
        }


def test_no_metrics_reads_as_nothing(recording: Any) -> None:
    with recording(metrics=False) as srv:
        assert metrics.scrape(srv.url) == {}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening
        assert metrics.scrape(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=2) == {}
