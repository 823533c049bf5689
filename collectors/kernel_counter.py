"""Prometheus series whose value is one the kernel keeps, absent until first read."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector as MetricsCollector


class KernelCounter(MetricsCollector):
    """Exposes the kernel's own running total (it may reset at reboot); ``value`` None
    (never read, or not readable now) exposes nothing rather than a stale number."""

    family: type[CounterMetricFamily] | type[GaugeMetricFamily] = CounterMetricFamily

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value: int | None = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self.value is not None:
            yield self.family(self.name, self.documentation, value=self.value)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield self.family(self.name, self.documentation)


class KernelGauge(KernelCounter):
    """A value the kernel reports now (a count, a limit)."""

    family = GaugeMetricFamily
