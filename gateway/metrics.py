"""Prometheus metrics of one gateway process, on a registry of its own (no module-level singletons).

The hot path only increments plain counters on the hub and the bus; they are read at scrape time by a
collector, so a fan-out to 10,000 sockets costs no Prometheus call per recipient.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Callback(Collector):
    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        return self._read()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("gateway_connections_open", "Open WebSocket connections", registry=r)
        self.eventsource_connections = Gauge("gateway_eventsource_connections_open",
                                             "Open event-source (RFC 8620 §7.3) streams", registry=r)
        self.upgrades = Counter("gateway_upgrades_total", "WebSocket upgrades by outcome", ["outcome"], registry=r)
        self.messages_in = Counter("gateway_messages_in_total", "Client messages received", registry=r)
        self.messages_out = Counter("gateway_messages_out_total", "Messages sent by type", ["type"], registry=r)
        self.request_errors = Counter("gateway_request_errors_total", "RequestErrors sent by type", ["type"],
                                      registry=r)
        self.closes = Counter("gateway_close_codes_total", "WebSocket closes by code", ["code"], registry=r)
        self.slow_closes = Counter("gateway_slow_client_closes_total", "Sockets closed for being too slow",
                                   registry=r)
        self.http_requests = Counter("gateway_http_requests_total", "HTTP requests by route and status",
                                     ["route", "status"], registry=r)

    def add_callback(self, read: Callable[[], Iterator[Metric]]) -> None:
        """Register a function that yields metric families at scrape time (hub and bus counters)."""
        self.registry.register(_Callback(read))

    def message_in(self) -> None:
        self.messages_in.inc()

    def message_out(self, kind: str) -> None:
        self.messages_out.labels(kind).inc()

    def reply_sent(self, error: str | None) -> None:
        """A Response (error None) or a RequestError of type `error` went out on a socket."""
        if error is None:
            self.messages_out.labels("Response").inc()
            return
        self.request_errors.labels(error.rsplit(":", 1)[-1]).inc()
        self.messages_out.labels("RequestError").inc()

    def close(self, code: int) -> None:
        self.closes.labels(str(code)).inc()
        if code == 1013:  # RFC 6455 §7.4.1 try again later: only ever sent to a client that does not read
            self.slow_closes.inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def counters(prefix: str, rows: Iterable[tuple[str, str, float]]) -> Iterator[Metric]:
    """Counter families from (name, help, value) rows, as the bus and request-path ports report them."""
    for name, doc, value in rows:
        yield counter(prefix + name, doc, value)


def histogram(name: str, doc: str, bounds: Sequence[float], counts: Sequence[int], total: float
              ) -> HistogramMetricFamily:
    """A histogram family from per-bucket counts (the last one +Inf) kept by the hot path itself."""
    cumulative = list(itertools.accumulate(counts))
    buckets = [(repr(b), float(c)) for b, c in zip(bounds, cumulative, strict=False)]
    buckets.append(("+Inf", float(cumulative[-1])))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    if labels:
        g = GaugeMetricFamily(name, doc, labels=list(labels))
        g.add_metric(list(labels.values()), value)
        return g
    return GaugeMetricFamily(name, doc, value=value)
