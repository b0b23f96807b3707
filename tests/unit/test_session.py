"""The sans-I/O connection core: frames and the time in, actions out (RFC 6455 close rules, RFC 7692 inflation,
RFC 8887 messages, keepalive, expiry, slow clients). Every test runs on the compiled coalescer and its twin."""

from __future__ import annotations

import json
import zlib
from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import native
from gateway.deflate import Compression
from gateway.errors import RequestLevelError
from gateway.jmap.types import CORE, WEBSOCKET, ApiResponse
from gateway.session import (
    BINARY,
    CLOSE,
    CONTINUATION,
    NEVER,
    PING,
    PONG,
    TEXT,
    CloseWith,
    DisablePush,
    EchoSession,
    EnablePush,
    Limits,
    Ping,
    Reply,
    Run,
    Session,
)
from tests.native_impl import load_impl

LIMITS: dict[str, Any] = dict(max_calls=4, max_concurrent=2, ping_interval=30.0, ping_timeout=10.0,
                              slow_timeout=5.0, slow_max_bytes=1000)


@pytest.fixture(params=["native", "python"])
def coalesce(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("_coalesce", request.param)


def make(coalesce: ModuleType, *, deflate: bool = False, expires_at: float | None = None, **limits: Any) -> Session:
    compression = Compression(native.load("_deflate", native=False), level=6, min_bytes=0, max_size=10_000)
    return Session(Limits(**{**LIMITS, **limits}), frozenset({CORE, WEBSOCKET}), coalesce.Coalescer(10_000, deflate),
                   now=0.0, expires_at=expires_at, inflate=compression.inflate if deflate else None,
                   utf8_valid=coalesce.utf8_valid)


def text(s: Session, data: bytes, now: float = 0.0) -> Any:
    return s.frame(TEXT, True, 0, memoryview(data), now)


def request(rid: str | None = "r", calls: int = 1, using: list[str] | None = None) -> bytes:
    msg: dict[str, Any] = {"@type": "Request", "using": using or [CORE],
                           "methodCalls": [["Core/echo", {"i": i}, f"c{i}"] for i in range(calls)]}
    if rid is not None:
        msg["id"] = rid
    return json.dumps(msg).encode()


def deflated(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]  # RFC 7692 §7.2.1: drop the 0x00 0x00 0xff 0xff


# --- messages (RFC 8887 §4.3) ----------------------------------------------------------------------------------

def test_request_runs_and_finishes_with_request_id(coalesce: ModuleType) -> None:
    s = make(coalesce)
    action = text(s, request("abc"))
    assert isinstance(action, Run) and action.request_id == "abc" and s.in_flight == 1
    reply = s.finish("abc", ApiResponse(methodResponses=[("Core/echo", {}, "c0")], sessionState="7"))
    assert reply.error is None
    assert json.loads(reply.payload) == {"@type": "Response", "methodResponses": [["Core/echo", {}, "c0"]],
                                         "sessionState": "7", "requestId": "abc"}
    assert s.in_flight == 0


def test_a_failed_request_is_a_request_error_with_its_type(coalesce: ModuleType) -> None:
    s = make(coalesce)
    text(s, request("x"))
    reply = s.finish("x", RequestLevelError("urn:ietf:params:jmap:error:limit", "too big", limit="maxSizeRequest"))
    out = json.loads(reply.payload)
    assert out["@type"] == "RequestError" and out["requestId"] == "x" and out["limit"] == "maxSizeRequest"
    assert reply.error == "urn:ietf:params:jmap:error:limit"
    crashed = s.finish("y", RuntimeError("boom")) if s.in_flight else None
    assert crashed is None
    text(s, request("y"))
    assert json.loads(s.finish("y", RuntimeError("boom")).payload)["type"].endswith(":serverFail")


def test_concurrency_limit_and_release(coalesce: ModuleType) -> None:
    s = make(coalesce, max_concurrent=2)
    assert isinstance(text(s, request("1")), Run)
    assert isinstance(text(s, request("2")), Run)
    third = text(s, request("3"))
    assert isinstance(third, Reply)
    err = json.loads(third.payload)
    assert err["limit"] == "maxConcurrentRequests" and err["requestId"] == "3" and third.error is not None
    s.finish("1", ApiResponse(methodResponses=[], sessionState="0"))
    assert isinstance(text(s, request("4")), Run)


def test_limits_and_capabilities(coalesce: ModuleType) -> None:
    s = make(coalesce, max_calls=2)
    err = json.loads(text(s, request("m", calls=3)).payload)
    assert err["type"].endswith(":limit") and err["limit"] == "maxCallsInRequest"
    err = json.loads(text(s, request("u", using=[CORE, "urn:x"])).payload)
    assert err["type"].endswith(":unknownCapability") and err["requestId"] == "u"
    assert s.in_flight == 0


def test_push_messages(coalesce: ModuleType) -> None:
    s = make(coalesce)
    a = text(s, b'{"@type":"WebSocketPushEnable","dataTypes":["Email","Mailbox"],"pushState":"t"}')
    assert isinstance(a, EnablePush) and a.data_types == frozenset({"Email", "Mailbox"}) and a.push_state == "t"
    a = text(s, b'{"@type":"WebSocketPushEnable"}')
    assert isinstance(a, EnablePush) and a.data_types is None and a.push_state is None
    a = text(s, b'{"@type":"WebSocketPushEnable","dataTypes":[]}')
    assert isinstance(a, EnablePush) and a.data_types == frozenset()
    assert isinstance(text(s, b'{"@type":"WebSocketPushDisable"}'), DisablePush)


def test_not_json_and_not_request(coalesce: ModuleType) -> None:
    s = make(coalesce)
    err = json.loads(text(s, b"{nope").payload)
    assert err["type"].endswith(":notJSON") and err["requestId"] is None
    err = json.loads(text(s, b'{"@type":"Response","id":"q7"}').payload)
    assert err["type"].endswith(":notRequest") and err["requestId"] == "q7"


def test_binary_closes_1003_and_nothing_happens_after_a_close(coalesce: ModuleType) -> None:
    s = make(coalesce)
    a = s.frame(BINARY, True, 0, memoryview(b"{}"), 0.0)
    assert isinstance(a, CloseWith) and a.code == 1003 and not a.echo
    assert s.closing and s.deadline == NEVER
    assert text(s, request("late")) is None


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_give_an_action(data: bytes) -> None:
    s = make(load_impl("_coalesce", "python"))
    a = text(s, data)
    if isinstance(a, CloseWith):
        assert a.code == 1007  # not UTF-8
        return
    assert isinstance(a, Reply | Run | EnablePush | DisablePush)
    if isinstance(a, Reply):
        err = msgspec.json.decode(a.payload)
        assert err["@type"] == "RequestError" and "requestId" in err


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12),
       st.sampled_from(["Request", "WebSocketPushEnable", "WebSocketPushDisable", "Response", "StateChange", None]))
def test_arbitrary_json_never_raises(body: object, tag: str | None) -> None:
    if isinstance(body, dict) and tag is not None:
        body = {**body, "@type": tag}
    a = text(make(load_impl("_coalesce", "python")), json.dumps(body).encode())
    assert isinstance(a, Reply | Run | EnablePush | DisablePush)


# --- frames (RFC 6455 §5, RFC 7692) ----------------------------------------------------------------------------

def test_fragments_make_one_message(coalesce: ModuleType) -> None:
    s = make(coalesce)
    body = request("frag")
    assert s.frame(TEXT, False, 0, memoryview(body[:10]), 0.0) is None
    assert s.frame(PING, True, 0, memoryview(b"p"), 0.0) is None  # a control frame between fragments
    run = s.frame(CONTINUATION, True, 0, memoryview(body[10:]), 0.0)
    assert isinstance(run, Run) and run.request_id == "frag"


@pytest.mark.parametrize(("payload", "code", "echo"), [
    (b"", 1000, True), ((1000).to_bytes(2, "big"), 1000, True), ((3001).to_bytes(2, "big") + b"bye", 3001, True),
    ((1005).to_bytes(2, "big"), 1002, False), ((999).to_bytes(2, "big"), 1002, False),
])
def test_close_frames_are_echoed_or_refused(coalesce: ModuleType, payload: bytes, code: int, echo: bool) -> None:
    s = make(coalesce)
    a = s.frame(CLOSE, True, 0, memoryview(payload), 0.0)
    assert isinstance(a, CloseWith) and (a.code, a.echo) == (code, echo)
    assert s.closing


def test_rsv_bits_without_an_extension_fail_1002(coalesce: ModuleType) -> None:
    a = make(coalesce).frame(TEXT, True, 4, memoryview(b"{}"), 0.0)
    assert isinstance(a, CloseWith) and a.code == 1002


def test_compressed_messages_are_inflated_and_checked(coalesce: ModuleType) -> None:
    s = make(coalesce, deflate=True)
    run = s.frame(TEXT, True, 4, memoryview(deflated(request("z"))), 0.0)
    assert isinstance(run, Run) and run.request_id == "z"
    bad_utf8 = make(coalesce, deflate=True).frame(TEXT, True, 4, memoryview(deflated(b'"\xff\xfe"')), 0.0)
    assert isinstance(bad_utf8, CloseWith) and bad_utf8.code == 1007
    bomb = make(coalesce, deflate=True).frame(TEXT, True, 4, memoryview(deflated(b" " * 50_000)), 0.0)
    assert isinstance(bomb, CloseWith) and bomb.code == 1009  # the limit holds after inflation
    corrupt = make(coalesce, deflate=True).frame(TEXT, True, 4, memoryview(b"\xff\xff\xff"), 0.0)
    assert isinstance(corrupt, CloseWith) and corrupt.code == 1007


def test_the_echo_session_keeps_the_frame_rules(coalesce: ModuleType) -> None:
    s = EchoSession(Limits(**LIMITS), frozenset(), coalesce.Coalescer(100, False), now=0.0)
    echo = s.frame(BINARY, True, 0, memoryview(b"\x00\x01"), 0.0)
    assert (type(echo).__name__, echo.opcode, echo.payload) == ("Echo", BINARY, b"\x00\x01")  # type: ignore[union-attr]
    too_big = s.frame(TEXT, True, 0, memoryview(b"x" * 101), 0.0)
    assert isinstance(too_big, CloseWith) and too_big.code == 1009


# --- time: keepalive, expiry, slow clients ----------------------------------------------------------------------

def test_keepalive_pings_a_silent_peer_and_closes_it_without_a_pong(coalesce: ModuleType) -> None:
    s = make(coalesce)
    assert s.deadline == 30.0
    assert s.timer(29.0) is None
    assert isinstance(s.timer(30.0), Ping)
    assert s.deadline == 40.0  # the pong deadline
    closed = s.timer(40.0)
    assert isinstance(closed, CloseWith) and closed.code == 1001


def test_a_pong_or_any_frame_keeps_the_peer_alive(coalesce: ModuleType) -> None:
    s = make(coalesce)
    assert isinstance(s.timer(30.0), Ping)
    assert s.frame(PONG, True, 0, memoryview(b"gw"), 31.0) is None
    assert s.deadline == 61.0 and s.timer(40.0) is None
    assert isinstance(s.timer(61.0), Ping)
    text(s, request("busy"), now=62.0)  # not a pong, but proof of life all the same
    assert s.timer(71.0) is None and s.deadline == 92.0


def test_an_idle_socket_that_answers_is_never_closed(coalesce: ModuleType) -> None:
    s = make(coalesce)
    now = 0.0
    for _ in range(10):
        now = s.deadline
        assert isinstance(s.timer(now), Ping)
        s.frame(PONG, True, 0, memoryview(b"gw"), now + 1)
    assert not s.closing


def test_no_pings_when_the_interval_is_zero(coalesce: ModuleType) -> None:
    s = make(coalesce, ping_interval=0.0)
    assert s.deadline == NEVER and s.timer(1e9) is None


def test_expiry_closes_with_1008(coalesce: ModuleType) -> None:
    s = make(coalesce, expires_at=12.5)
    assert s.deadline == 12.5
    assert s.timer(12.0) is None
    closed = s.timer(12.5)
    assert isinstance(closed, CloseWith) and closed.code == 1008 and closed.reason == "token expired"


def test_a_socket_paused_too_long_is_closed_1013_and_aborted(coalesce: ModuleType) -> None:
    s = make(coalesce)
    s.paused(3.0)
    s.paused(4.0)  # still the first pause that counts
    assert s.deadline == 8.0
    closed = s.timer(8.0)
    assert isinstance(closed, CloseWith) and closed.code == 1013 and closed.abort


def test_a_socket_that_drains_in_time_is_not_closed(coalesce: ModuleType) -> None:
    s = make(coalesce)
    s.paused(3.0)
    s.resumed()
    assert s.deadline == 30.0 and s.timer(8.0) is None


def test_replies_to_a_paused_socket_are_bounded(coalesce: ModuleType) -> None:
    s = make(coalesce)
    assert s.wrote_reply(10_000) is None  # not paused: the kernel and the buffer drain it
    s.paused(1.0)
    assert s.wrote_reply(999) is None
    closed = s.wrote_reply(1001)
    assert isinstance(closed, CloseWith) and closed.code == 1013
    assert isinstance(s.close(1000, "again"), DisablePush)  # closing twice sends one close frame


def test_nesting_beyond_the_limit_is_not_json_and_nothing_runs(coalesce: ModuleType) -> None:
    s = make(coalesce, max_depth=8)
    deep = json.dumps({"@type": "Request", "id": "d", "using": [CORE],
                       "methodCalls": [["Core/echo", {"x": [[[[[1]]]]]}, "c"]]}).encode()  # 9 levels
    action = text(s, deep)
    assert isinstance(action, Reply) and s.in_flight == 0
    error = json.loads(action.payload)
    assert error["type"] == "urn:ietf:params:jmap:error:notJSON" and error["requestId"] is None
    assert isinstance(text(s, deep.replace(b"[[[[[1]]]]]", b"[[[[1]]]]")), Run)
    # The default limit (64) holds for sessions made without one.
    assert isinstance(text(make(coalesce), b"[" * 4000 + b"]" * 4000), Reply)
