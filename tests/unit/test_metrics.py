"""Metrics of one process (gateway.metrics): a registry per instance, labelled counters, and callbacks read at
scrape time; the merge of several processes into one page (a process group). The rendered text is read back with
prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    CONTENT_TYPE,
    Family,
    Metrics,
    Sample,
    counter,
    cumulative,
    exposition,
    figures,
    gauge,
    histogram,
    merge,
)


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
    from gateway._broadcast_py import FANOUT_BOUNDS, Stats
    from gateway.metrics import histogram

    stats = Stats()
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


# --- several processes on one page (gateway.metrics.merge) ---------------------------------------------------

def with_fanout(m: Metrics, *seconds: float) -> Metrics:
    """`m` with the hub's fan-out histogram (kept by the hub, read at scrape time) after these observations."""
    from gateway._broadcast_py import FANOUT_BOUNDS, Stats

    stats = Stats()
    for value in seconds:
        stats.fanout(value)
    m.add_callback(lambda: iter([histogram("gateway_fanout_seconds", "Fan-out time", FANOUT_BOUNDS,
                                           stats.fanout_counts, stats.fanout_sum)]))
    return m


def parse(page: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(page.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def page_of(*parts: tuple[str, Metrics]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The merged page of these processes, read back by prometheus_client's parser."""
    return parse(exposition(merge([(label, figures(m.registry)) for label, m in parts])))


def test_one_process_merged_is_its_own_page() -> None:
    m = Metrics()
    m.upgrades.labels("ok").inc()
    with_fanout(m, 0.002)
    m.add_callback(lambda: iter([counter("gateway_events_received", "Events taken from the bus", 7)]))
    assert exposition(merge([("1", figures(m.registry))])) == m.render()


def test_counters_histograms_and_gauges_add_up_across_processes() -> None:
    a, b = Metrics(), Metrics()
    a.upgrades.labels("ok").inc()
    b.upgrades.labels("ok").inc(4)
    b.upgrades.labels("unauthorized").inc()
    a.connections.inc(3)
    b.connections.inc(2)
    with_fanout(a, 0.002)
    with_fanout(b, 0.002, 0.2)
    got = page_of(("1", a), ("2", b))
    assert got[("gateway_upgrades_total", (("outcome", "ok"),))] == 5
    assert got[("gateway_upgrades_total", (("outcome", "unauthorized"),))] == 1  # a series only one process has
    assert got[("gateway_connections_open", ())] == 5  # the group's sockets
    assert got[("gateway_fanout_seconds_bucket", (("le", "0.001"),))] == 0
    assert got[("gateway_fanout_seconds_bucket", (("le", "0.005"),))] == 2  # bucket by bucket
    assert got[("gateway_fanout_seconds_bucket", (("le", "0.5"),))] == 3
    assert got[("gateway_fanout_seconds_count", ())] == 3
    assert abs(got[("gateway_fanout_seconds_sum", ())] - 0.204) < 1e-9


def test_created_timestamps_take_the_earliest() -> None:
    early, late = Metrics(), Metrics()
    created = {f.name: f for f in figures(early.registry)}["gateway_messages_in"]
    stamp = next(s.value for s in created.samples if s.name.endswith("_created"))
    got = page_of(("2", late), ("1", early))
    assert got[("gateway_messages_in_created", ())] == stamp


def test_process_gauges_stay_apart_under_a_worker_label() -> None:
    def native(value: float) -> Iterator[Metric]:
        yield gauge("gateway_native_module", "1 when the compiled module runs", value, {"module": "broadcast"})

    a, b = Metrics(), Metrics()
    a.add_callback(lambda: native(1.0))
    b.add_callback(lambda: native(0.0))
    got = page_of(("1", a), ("2", b))
    assert got[("gateway_native_module", (("module", "broadcast"), ("worker", "1")))] == 1
    assert got[("gateway_native_module", (("module", "broadcast"), ("worker", "2")))] == 0


def test_what_a_dead_process_leaves_is_its_counters() -> None:
    dead, live = with_fanout(Metrics(), 0.01), Metrics()
    dead.connections.inc()
    dead.message_in()
    live.connections.inc(2)
    kept = cumulative(figures(dead.registry))
    assert {f.type for f in kept} == {"counter", "histogram"}
    got = parse(exposition(merge([("1", figures(live.registry)), ("retired", kept)])))
    assert got[("gateway_messages_in_total", ())] == 1  # still counted
    assert got[("gateway_connections_open", ())] == 2  # the sockets of the live process only


def test_a_family_of_another_type_is_left_out_not_mixed_in() -> None:
    a = [Family("x", "counter", "x", [Sample("x_total", {}, 1.0)])]
    b = [Family("x", "gauge", "x", [Sample("x", {}, 5.0)])]
    assert merge([("1", a), ("2", b)]) == [Family("x", "counter", "x", [Sample("x_total", {}, 1.0)])]
