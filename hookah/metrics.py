"""
Hookah's Prometheus metrics, in a registry of their own per service (so
tests and several services in one process never collide).

Counters and histograms are updated where things happen; gauges that
describe current state (queue depth, open streams, subscriptions) are read
when scraped, from the ``gauges`` callbacks the service registers, so the
hot path never pays for them.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# A gauge's samples: (label values, value) pairs, read at scrape time.
GaugeReader = Callable[[], Iterable[Tuple[Tuple[str, ...], float]]]


class _StateCollector(Collector):
    def __init__(self) -> None:
        self.gauges: Dict[str, Tuple[str, Tuple[str, ...], GaugeReader]] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (doc, labels, read) in self.gauges.items():
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            for label_values, value in read():
                family.add_metric(list(label_values), value)
            yield family


class Tally:
    """
    Increments of one counter child kept as a plain int on the hot path and
    added to the child whenever metrics are collected (a scrape, the status
    page, ``Metrics.refresh`` under ``--workers``): prometheus_client takes
    a lock and checks the metric on every ``inc``, and the counters a
    webhook moves cost about 3 % of the reactor thread under dispatch load.
    Reactor thread only, like everything that collects.
    """

    __slots__ = ("_child", "count")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.count = 0

    def inc(self) -> None:
        self.count += 1

    def fold(self) -> None:
        count = self.count
        if count:
            self.count = 0
            self._child.inc(count)


class HistogramTally:
    """
    Observations of one histogram kept as plain per-bucket counts and a sum,
    added to it at each collection like ``Tally``: ``Histogram.observe``
    walks the bounds and takes two locks per call, about 2 % of the reactor
    thread under dispatch load (one observation per attempt).

    prometheus_client has no public call that adds many observations at
    once, so folding adds to the histogram's bucket and sum values, which
    are private. This class is the one place that does: it checks that the
    histogram has them as expected (a list of values per bound, each with
    ``inc``) and otherwise passes every observation straight to ``observe``.
    """

    __slots__ = ("_histogram", "_bounds", "_counts", "_sum", "direct")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        total = getattr(histogram, "_sum", None)
        self.direct = not (
            isinstance(bounds, list)
            and isinstance(buckets, list)
            and len(bounds) == len(buckets) > 0
            and all(callable(getattr(value, "inc", None)) for value in [*buckets, total])
        )
        self._bounds: List[float] = list(bounds) if not self.direct and bounds is not None else []
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        # NaN is below no bound, so observe() counts it in no bucket (only in
        # the sum), where bisect would put it in the first.
        if self.direct or amount != amount:
            self._histogram.observe(amount)
            return
        # The first bound >= amount: the bucket observe() would count it in.
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def fold(self) -> None:
        if self.direct:
            return
        counts, total = self._counts, self._sum
        if not any(counts):
            return
        self._counts, self._sum = [0] * len(counts), 0.0
        buckets = self._histogram._buckets  # type: ignore[attr-defined]
        self._histogram._sum.inc(total)  # type: ignore[attr-defined]
        for value, count in zip(buckets, counts):
            if count:
                value.inc(count)


class _Folder(Collector):
    """Registered before every metric, so each collection starts by folding the tallies in."""

    def __init__(self, fold: Callable[[], None]) -> None:
        self._fold = fold

    def collect(self) -> Iterable[GaugeMetricFamily]:
        self._fold()
        return iter(())


class Metrics:
    """
    Under ``--workers`` (``PROMETHEUS_MULTIPROC_DIR`` set by the master, see
    ``hookah.workers``) counters and histograms are kept in that directory
    by prometheus_client, and ``exposed`` adds up every worker's; gauges of
    one process's state (``local``) are published there too and summed.
    """

    def __init__(self, shared_dir: Optional[str] = None) -> None:
        self.shared_dir = shared_dir if shared_dir is not None else os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        self._local: List[Tuple[Gauge, Tuple[str, ...], GaugeReader]] = []
        self.registry = CollectorRegistry(auto_describe=True)
        self._tallies: List[Tally | HistogramTally] = []
        self.registry.register(_Folder(self.fold))
        self.dispatches = Counter(
            "hookah_dispatches_accepted", "Requests accepted by /dispatch", ["target"], registry=self.registry
        )
        self.deliveries = Counter(
            "hookah_deliveries_finished", "Deliveries that reached a final state", ["outcome"], registry=self.registry
        )
        self.attempts = Counter(
            "hookah_delivery_attempts", "Delivery attempts by result class", ["result"], registry=self.registry
        )
        self.attempt_seconds = Histogram(
            "hookah_attempt_duration_seconds",
            "Time from sending a delivery attempt to its outcome",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.attempt_timings = self.histogram_tally(self.attempt_seconds)
        self.verifications = Counter(
            "hookah_websub_verifications", "WebSub verifications of intent by outcome", ["mode", "outcome"], registry=self.registry
        )
        self.events = Counter("hookah_events_published", "Events published to topics", registry=self.registry)
        self.claims_lost = Counter(
            "hookah_claims_lost",
            "Attempts whose outcome was refused because another node had taken the delivery over"
            " (its lease ran out): duplicate attempts",
            registry=self.registry,
        )
        self._state = _StateCollector()
        self.registry.register(self._state)

    def gauge(
        self, name: str, doc: str, read: GaugeReader, labels: Tuple[str, ...] = (), local: bool = False,
        shared_only: bool = False,
    ) -> None:
        """
        Register a gauge whose samples ``read`` returns at scrape time.
        ``local``: it describes this process only (open connections,
        attempts in flight), so under ``--workers`` it is summed over them.
        ``shared_only``: kept only under ``--workers`` (for ``summed``).
        """
        if local and self.shared_dir:
            gauge = Gauge(name, doc, list(labels), registry=None, multiprocess_mode="livesum")
            self._local.append((gauge, labels, read))
        elif not shared_only:
            self._state.gauges[name] = (doc, labels, read)

    def tally(self, child: Counter) -> Tally:
        """A ``Tally`` for ``child`` (a counter, or one of its label children), folded in at each collection."""
        tally = Tally(child)
        self._tallies.append(tally)
        return tally

    def histogram_tally(self, histogram: Histogram) -> HistogramTally:
        """A ``HistogramTally`` for ``histogram``, folded in at each collection."""
        tally = HistogramTally(histogram)
        self._tallies.append(tally)
        return tally

    def fold(self) -> None:
        """Add every tally's counts to its metric."""
        for tally in self._tallies:
            tally.fold()

    def refresh(self) -> None:
        """Publish this worker's tallies and ``local`` gauges for the others' scrapes (a timer calls it)."""
        self.fold()
        for gauge, labels, read in self._local:
            if not labels:
                for _, value in read():
                    gauge.set(value)
                continue
            seen = set()
            for label_values, value in read():
                gauge.labels(*label_values).set(value)
                seen.add(tuple(label_values))
            # Label values this process no longer has (a topic's last
            # stream closed) count zero, not their last value.
            for sample in next(iter(gauge.collect())).samples:
                key = tuple(sample.labels[name] for name in labels)
                if key not in seen and sample.value:
                    gauge.labels(*key).set(0)

    def summed(self, name: str) -> Optional[Dict[Tuple[str, ...], float]]:
        """Under ``--workers``: a ``local`` gauge's samples summed over every worker; None otherwise."""
        if not self.shared_dir:
            return None
        from prometheus_client.multiprocess import MultiProcessCollector

        self.refresh()
        totals: Dict[Tuple[str, ...], float] = {}
        for family in MultiProcessCollector(None, path=self.shared_dir).collect():
            if family.name != name:
                continue
            for sample in family.samples:
                key = tuple(v for k, v in sorted(sample.labels.items()) if k != "pid")
                totals[key] = totals.get(key, 0.0) + sample.value
        return totals

    def exposed(self) -> CollectorRegistry:
        """The registry a scrape encodes: this process's, or every worker's summed."""
        if not self.shared_dir:
            return self.registry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.refresh()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.shared_dir)
        registry.register(self._state)
        return registry

    def render(self) -> bytes:
        return generate_latest(self.exposed())


def result_class(status_code: int | None) -> str:
    """``2xx``, ``4xx``... or ``error`` when no response came."""
    return f"{status_code // 100}xx" if status_code else "error"
