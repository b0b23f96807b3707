"""The sans-I/O session: bytes in, actions and bytes out."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import RequestLevelError
from gateway.jmap.types import CORE, WEBSOCKET, ApiResponse
from gateway.session import BINARY, TEXT, CloseWith, DisablePush, EnablePush, JmapSession, Reply, Run


def make(max_calls: int = 4, max_concurrent: int = 2) -> JmapSession:
    return JmapSession(frozenset({CORE, WEBSOCKET}), max_calls, max_concurrent)


def request(rid: str | None = "r", calls: int = 1, using: list[str] | None = None) -> bytes:
    msg = {"@type": "Request", "using": using or [CORE],
           "methodCalls": [["Core/echo", {"i": i}, f"c{i}"] for i in range(calls)]}
    if rid is not None:
        msg["id"] = rid
    return json.dumps(msg).encode()


def test_request_runs_and_finishes_with_request_id() -> None:
    s = make()
    action = s.receive(TEXT, request("abc"))
    assert isinstance(action, Run) and action.request_id == "abc" and s.in_flight == 1
    out = json.loads(s.finish("abc", ApiResponse(methodResponses=[("Core/echo", {}, "c0")], sessionState="7")))
    assert out == {"@type": "Response", "methodResponses": [["Core/echo", {}, "c0"]], "sessionState": "7",
                   "requestId": "abc"}
    assert s.in_flight == 0


def test_request_level_error_result() -> None:
    s = make()
    s.receive(TEXT, request("x"))
    error = RequestLevelError("urn:ietf:params:jmap:error:limit", "too big", limit="maxSizeRequest")
    out = json.loads(s.finish("x", error))
    assert out["@type"] == "RequestError" and out["requestId"] == "x" and out["limit"] == "maxSizeRequest"


def test_concurrency_limit_and_release() -> None:
    s = make(max_concurrent=2)
    assert isinstance(s.receive(TEXT, request("1")), Run)
    assert isinstance(s.receive(TEXT, request("2")), Run)
    third = s.receive(TEXT, request("3"))
    assert isinstance(third, Reply)
    err = json.loads(third.payload)
    assert err["limit"] == "maxConcurrentRequests" and err["requestId"] == "3"
    s.finish("1", ApiResponse(methodResponses=[], sessionState="0"))
    assert isinstance(s.receive(TEXT, request("4")), Run)


def test_limits_and_capabilities() -> None:
    s = make(max_calls=2)
    err = json.loads(s.receive(TEXT, request("m", calls=3)).payload)  # type: ignore[union-attr]
    assert err["type"].endswith(":limit") and err["limit"] == "maxCallsInRequest"
    err = json.loads(s.receive(TEXT, request("u", using=[CORE, "urn:x"])).payload)  # type: ignore[union-attr]
    assert err["type"].endswith(":unknownCapability") and err["requestId"] == "u"
    assert s.in_flight == 0


def test_push_messages() -> None:
    s = make()
    a = s.receive(TEXT, b'{"@type":"WebSocketPushEnable","dataTypes":["Email","Mailbox"],"pushState":"t"}')
    assert isinstance(a, EnablePush) and a.data_types == frozenset({"Email", "Mailbox"}) and a.push_state == "t"
    a = s.receive(TEXT, b'{"@type":"WebSocketPushEnable"}')
    assert isinstance(a, EnablePush) and a.data_types is None and a.push_state is None
    a = s.receive(TEXT, b'{"@type":"WebSocketPushEnable","dataTypes":[]}')
    assert isinstance(a, EnablePush) and a.data_types == frozenset()
    assert isinstance(s.receive(TEXT, b'{"@type":"WebSocketPushDisable"}'), DisablePush)


def test_binary_closes_1003() -> None:
    a = make().receive(BINARY, b"{}")
    assert isinstance(a, CloseWith) and a.code == 1003


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_give_an_action(data: bytes) -> None:
    s = make()
    a = s.receive(TEXT, data)
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
    a = make().receive(TEXT, json.dumps(body).encode())
    assert isinstance(a, Reply | Run | EnablePush | DisablePush)


def test_nesting_beyond_the_limit_is_not_json_and_nothing_runs() -> None:
    session = JmapSession(frozenset({CORE, WEBSOCKET}), 4, 2, max_json_depth=8)
    deep = json.dumps({"@type": "Request", "id": "d", "using": [CORE],
                       "methodCalls": [["Core/echo", {"x": [[[[[1]]]]]}, "c"]]}).encode()  # 9 levels
    action = session.receive(TEXT, deep)
    assert isinstance(action, Reply) and session.in_flight == 0
    error = json.loads(action.payload)
    assert error["type"] == "urn:ietf:params:jmap:error:notJSON" and error["requestId"] is None
    assert isinstance(session.receive(TEXT, deep.replace(b"[[[[[1]]]]]", b"[[[[1]]]]")), Run)
    # The default limit (64) holds for sessions made without one.
    assert isinstance(make().receive(TEXT, b"[" * 100_000 + b"]" * 100_000), Reply)
