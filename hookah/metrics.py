"""
Hookah's Prometheus metrics, in a registry of their own per service (so
tests and several services in one process never collide).

Counters and histograms are updated where things happen; gauges that
describe current state (queue depth, open streams, subscriptions) are read
when scraped, from the ``gauges`` callbacks the service registers, so the
hot path never pays for them.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.verifications = Counter(
            "hookah_websub_verifications", "WebSub verifications of intent by outcome", ["mode", "outcome"], registry=self.registry
        )
        self.events = Counter("hookah_events_published", "Events published to topics", registry=self.registry)
        self._state = _StateCollector()
        self.registry.register(self._state)

    def gauge(self, name: str, doc: str, read: GaugeReader, labels: Tuple[str, ...] = ()) -> None:
        """Register a gauge whose samples ``read`` returns at scrape time."""
        self._state.gauges[name] = (doc, labels, read)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def result_class(status_code: int | None) -> str:
    """``2xx``, ``4xx``... or ``error`` when no response came."""
    return f"{status_code // 100}xx" if status_code else "error"
