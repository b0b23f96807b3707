"""Metrics of one process (gateway.metrics): a registry per instance, labelled counters, and callbacks read at
scrape time. The rendered text is read back with prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import CONTENT_TYPE, Metrics, counter, gauge


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered page: (name, sorted labels) -> value."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_and_labels() -> None:
    m = Metrics()
    m.message_in()
    m.message_in()
    m.message_out("Response")
    m.message_out("StateChange")
    m.message_out("StateChange")
    m.close(1008)
    m.close(1001)
    m.close(1008)
    m.connections.inc()
    m.upgrades.labels("ok").inc()
    m.http_requests.labels("/jmap/session", "200").inc()
    got = samples(m)
    assert got[("gateway_messages_in_total", ())] == 2
    assert got[("gateway_messages_out_total", (("type", "Response"),))] == 1
    assert got[("gateway_messages_out_total", (("type", "StateChange"),))] == 2
    assert got[("gateway_close_codes_total", (("code", "1008"),))] == 2
    assert got[("gateway_close_codes_total", (("code", "1001"),))] == 1
    assert got[("gateway_connections_open", ())] == 1
    assert got[("gateway_upgrades_total", (("outcome", "ok"),))] == 1
    assert got[("gateway_http_requests_total", (("route", "/jmap/session"), ("status", "200")))] == 1



def test_a_histogram_kept_by_the_hot_path() -> None:
    from gateway.fanout.hub import FANOUT_BOUNDS, HubStats
    from gateway.metrics import histogram

    stats = HubStats()
    for seconds in (0.002, 0.0021, 3.0):
        stats.fanout(seconds)
    m = Metrics()
    m.add_callback(lambda: iter([histogram("gateway_fanout_seconds", "x", FANOUT_BOUNDS, stats.fanout_counts,
                                           stats.fanout_sum)]))
    got = samples(m)
    assert got[("gateway_fanout_seconds_count", ())] == 3
    assert got[("gateway_fanout_seconds_bucket", (("le", "0.001"),))] == 0
    assert got[("gateway_fanout_seconds_bucket", (("le", "0.005"),))] == 2
    assert got[("gateway_fanout_seconds_bucket", (("le", "+Inf"),))] == 3
    assert abs(got[("gateway_fanout_seconds_sum", ())] - 3.0041) < 1e-9


def test_each_instance_has_its_own_registry() -> None:
    # No module-level singletons: two gateways in one process (as the tests run them) count apart.
    a, b = Metrics(), Metrics()
    a.message_in()
    assert samples(a)[("gateway_messages_in_total", ())] == 1
    assert samples(b)[("gateway_messages_in_total", ())] == 0


def test_callbacks_are_read_at_scrape_time() -> None:
    m = Metrics()
    state = {"events": 0, "subscriptions": 3}
    reads: list[int] = []

    def read() -> Iterator[Metric]:
        reads.append(1)
        yield counter("gateway_events_received", "Events taken from the bus", state["events"])
        yield gauge("gateway_push_subscriptions", "Push-enabled sessions", state["subscriptions"])
        yield gauge("gateway_bus_ready", "Whether the bus delivers", 1.0, {"bus": "memory"})

    m.add_callback(read)
    reads.clear()  # registering may describe the collector once
    state["events"] = 41
    first = samples(m)
    state["events"] = 42
    state["subscriptions"] = 0
    second = samples(m)
    assert len(reads) == 2, "one read per scrape, none in between"
    assert first[("gateway_events_received_total", ())] == 41
    assert second[("gateway_events_received_total", ())] == 42
    assert second[("gateway_push_subscriptions", ())] == 0
    assert second[("gateway_bus_ready", (("bus", "memory"),))] == 1


def test_the_page_is_prometheus_text() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    text = Metrics().render().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"gateway_connections_open", "gateway_messages_in", "gateway_close_codes",
            "gateway_slow_client_closes", "gateway_request_errors"} <= names
