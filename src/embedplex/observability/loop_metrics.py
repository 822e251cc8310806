"""Counters and histograms updated only on the event loop, read by Prometheus when it scrapes.

The per-request metrics (``Metrics.observe_request``) change on every request, on the loop that
also parses, routes and answers it. prometheus_client's ``Counter.inc`` and
``Histogram.observe`` take a lock each and walk Python code (a histogram tries its buckets one
by one, then locks its bucket and its sum): the six updates of a request cost more than the
request's own route handler code did. These series are plain numbers under the GIL: a count is
``+= 1``, a bucket is found by bisection, and nothing is locked, because only the event loop
thread updates them (a scrape from another thread reads a consistent-enough snapshot: a count
may be one request ahead of its sum, as prometheus_client allows too).

``collect`` yields the families prometheus_client's own types would: ``<name>_total`` and
``_created`` for a counter; ``_bucket`` (cumulative, ``le`` as Go prints it), ``_count``,
``_sum`` and ``_created`` for a histogram, so the exposition and the dashboards do not change.
"""

from __future__ import annotations

import math
import time
import typing
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# How prometheus_client writes an ``le`` bound (untyped in its package).
_go_float = typing.cast(Callable[[float], str], floatToGoString)


class CounterSeries:
    """One labelled counter: ``inc`` on the event loop only."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()

    def inc(self) -> None:
        self.value += 1


class HistogramSeries:
    """One labelled histogram: ``observe`` on the event loop only."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative (summed at scrape time)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # The first bound >= value: prometheus_client's "value <= upper bound" bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopCounter:
    """A labelled counter family of ``CounterSeries``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.series: dict[tuple[str, ...], CounterSeries] = {}

    def labels(self, *values: str) -> CounterSeries:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = CounterSeries()
        return series

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self.series.items()):
            family.add_metric(list(values), series.value, created=series.created)
        return family


class LoopHistogram:
    """A labelled histogram family of ``HistogramSeries`` over ``buckets`` (+Inf added)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = (*sorted(float(b) for b in buckets if b != math.inf), math.inf)
        self._les = [_go_float(b) for b in self.bounds]
        self.series: dict[tuple[str, ...], HistogramSeries] = {}

    def labels(self, *values: str) -> HistogramSeries:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = HistogramSeries(self.bounds)
        return series

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self.series.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, list(series.counts), strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, series.sum)
            labels = dict(zip(self.labelnames, values, strict=True))
            family.samples.append(Sample(f"{self.name}_created", labels, series.created))
        return family


class LoopMetrics(Collector):
    """The loop-only families of one registry, collected together."""

    def __init__(self) -> None:
        self.families: list[LoopCounter | LoopHistogram] = []

    def counter(self, name: str, documentation: str, labelnames: Sequence[str]) -> LoopCounter:
        counter = LoopCounter(name, documentation, labelnames)
        self.families.append(counter)
        return counter

    def histogram(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> LoopHistogram:
        histogram = LoopHistogram(name, documentation, labelnames, buckets)
        self.families.append(histogram)
        return histogram

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()
