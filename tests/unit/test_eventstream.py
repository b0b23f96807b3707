"""RFC 8620 §7.3 event streams as logic: the URL's variables, the framing of events, and the deadlines."""

from __future__ import annotations

import pytest

from gateway.errors import HTTPProblem
from gateway.eventstream import (
    MAX_PING,
    MIN_PING,
    NEVER,
    StreamState,
    parse_request,
    ping_event,
    response_head,
    state_event,
    stream_url,
)


def test_variables() -> None:
    r = parse_request({"types": ["Email,Mailbox"], "closeafter": ["state"], "ping": ["300"]})
    assert (r.types, r.close_after_state, r.ping) == (frozenset({"Email", "Mailbox"}), True, 300)
    r = parse_request({"types": ["*"]})
    assert (r.types, r.close_after_state, r.ping) == (None, False, 0)
    assert parse_request({"ping": ["1"]}).ping == MIN_PING  # clamped, and said so in the ping's data
    assert parse_request({"ping": ["999999"]}).ping == MAX_PING


@pytest.mark.parametrize("query", [{"types": [""]}, {"types": ["Email,,Mailbox"]}, {"closeafter": ["maybe"]},
                                   {"ping": ["-1"]}, {"ping": ["1.5"]}, {"ping": ["٣"]}])
def test_bad_variables_are_400(query: dict[str, list[str]]) -> None:
    with pytest.raises(HTTPProblem) as info:
        parse_request(query)
    assert info.value.status == 400


def test_framing() -> None:
    event = state_event(b'{"@type":"StateChange"}', "1tok")
    assert event == b'event: state\ndata: {"@type":"StateChange"}\nid: 1tok\n\n'
    assert ping_event(30) == b'event: ping\ndata: {"interval":30}\n\n'
    head = response_head()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Type: text/event-stream\r\n" in head
    assert head.endswith(b"\r\n\r\n") and b"Content-Length" not in head


def test_pings_count_from_the_last_event() -> None:
    s = StreamState(10, 0.0, expires_at=None, slow_timeout=5)
    assert s.deadline == 10
    s.sent(4.0)
    assert s.timer(10.0) is None and s.deadline == 14
    assert s.timer(14.0) == "ping" and s.deadline == 24
    assert StreamState(0, 0.0, expires_at=None, slow_timeout=5).deadline == NEVER


def test_expiry_and_slow_clients_end_the_stream() -> None:
    s = StreamState(0, 0.0, expires_at=7.0, slow_timeout=5)
    assert s.timer(6.9) is None and s.timer(7.0) == "expired" and s.closing and s.deadline == NEVER
    s = StreamState(0, 0.0, expires_at=None, slow_timeout=5)
    s.paused_since = 2.0
    assert s.deadline == 7.0 and s.timer(7.0) == "slow" and s.timer(8.0) is None


def test_stream_url_expands_the_template() -> None:
    # RFC 8620 §7.3 variables, level-1 expansion; `*` and `,` stay as they are (a query may hold them).
    template = "https://jmap.example.com/jmap/eventsource/?types={types}&closeafter={closeafter}&ping={ping}"
    assert stream_url(template, "*", "no", 30) == (
        "https://jmap.example.com/jmap/eventsource/?types=*&closeafter=no&ping=30")
    assert stream_url(template, "Email,Mailbox", "state") == (
        "https://jmap.example.com/jmap/eventsource/?types=Email,Mailbox&closeafter=state&ping=0")
    assert stream_url("/es?t={types}&x={unknown}", "a b&c") == "/es?t=a%20b%26c&x="
    assert parse_request({"types": ["*"], "closeafter": ["no"], "ping": ["30"]}).types is None  # what we send
