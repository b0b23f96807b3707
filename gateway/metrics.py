"""Prometheus metrics of one gateway process, on a registry of its own (no module-level singletons), and the
merge of several processes' figures into one page (a process group, GATEWAY_WORKERS > 1).

The hot path only increments plain counters on the hub and the bus; they are read at scrape time by a
collector, so a fan-out to 10,000 sockets costs no Prometheus call per recipient. Merging works on what a
registry yields at scrape time (`figures`), so it costs nothing between scrapes either. No I/O here.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

import msgspec
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

        # Set in a worker of a process group (gateway.group): the page of the whole group instead of this one's.
        self.gather: Callable[[], Awaitable[bytes]] | None = None

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
        """This process's page."""
        return bytes(generate_latest(self.registry))

    async def exposition(self) -> bytes:
        """What `/metrics` answers: this process's page, or in a process group the whole group's."""
        return self.render() if self.gather is None else await self.gather()


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


# --- several processes' figures on one page --------------------------------------------------------------------

class Sample(msgspec.Struct, array_like=True, frozen=True, gc=False):
    name: str  # as exposed: gateway_upgrades_total, gateway_fanout_seconds_bucket, ...
    labels: dict[str, str]
    value: float


class Family(msgspec.Struct, array_like=True, gc=False):
    """One metric family as a registry yields it at scrape time, in a form that crosses a process boundary."""

    name: str
    type: str  # counter, gauge, histogram, summary, info, ...
    help: str
    samples: list[Sample]


# Families whose samples add up across processes (what a dead process leaves behind: its counts stay counted).
CUMULATIVE = frozenset({"counter", "histogram", "summary"})
# Gauges that describe a process rather than count something: one series per worker, never a sum.
PER_WORKER_GAUGES = frozenset({"gateway_native_module"})
WORKER_LABEL = "worker"


def figures(registry: CollectorRegistry) -> list[Family]:
    """Everything `registry` exposes now (its callbacks are read once, as by a scrape)."""
    return [Family(m.name, m.type, m.documentation, [Sample(s.name, dict(s.labels), s.value) for s in m.samples])
            for m in registry.collect()]


def cumulative(families: Iterable[Family]) -> list[Family]:
    """The counters and histograms of `families`: what keeps counting once their process has gone."""
    return [f for f in families if f.type in CUMULATIVE]


def merge(parts: Iterable[tuple[str, Sequence[Family]]]) -> list[Family]:
    """One page out of (worker label, families) parts, family by family in order of first appearance.

    Counters, histograms (bucket by bucket, `_sum`, `_count`) and summaries are summed, except their `_created`
    timestamps, which take the earliest. Gauges are summed (connections, subscriptions: the group's total), except
    those of PER_WORKER_GAUGES and families of other types, which keep one series per part under a `worker` label.
    """
    merged: dict[str, tuple[Family, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]]] = {}
    for worker, families in parts:
        for family in families:
            entry = merged.get(family.name)
            if entry is None:
                entry = merged[family.name] = (Family(family.name, family.type, family.help, []), {})
            if entry[0].type != family.type:
                continue  # a process of another version: its series of that name are left out, not mixed in
            cumulative = family.type in CUMULATIVE
            apart = not cumulative and (family.type != "gauge" or family.name in PER_WORKER_GAUGES)
            series = entry[1]
            for sample in family.samples:
                labels = {**sample.labels, WORKER_LABEL: worker} if apart else sample.labels
                key = (sample.name, tuple(sorted(labels.items())))
                old = series.get(key)
                if old is None:
                    value = sample.value
                elif cumulative and sample.name.endswith("_created"):
                    value = min(old.value, sample.value)
                else:
                    value = old.value + sample.value
                series[key] = Sample(sample.name, labels, value)
    out = []
    for family, series in merged.values():
        family.samples = list(series.values())
        out.append(family)
    return out


class _Page(Collector):
    def __init__(self, families: Sequence[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            metric = Metric(family.name, family.help, family.type)
            for sample in family.samples:
                metric.add_sample(sample.name, sample.labels, sample.value)
            yield metric


def exposition(families: Sequence[Family]) -> bytes:
    """The Prometheus text page of `families` (prometheus_client writes it, as for a single process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Page(families))
    return bytes(generate_latest(registry))
