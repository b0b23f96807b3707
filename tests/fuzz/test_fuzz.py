"""Fuzz targets against the real gateway process of conftest.py, over real sockets: HTTP heads (upgrades and
plain requests), WebSocket frame sequences (with and without permessage-deflate), JMAP client messages (valid
shapes, hostile values) on the socket and over HTTP, James bus messages through `POST /admin/events`, and NDJSON
event streams (the ingest protocol's framing and lines).

Each target checks the answers against the vocabulary: HTTP 1xx-3xx, or 4xx with a problem-details body (never
5xx); close codes and RequestError types of DESIGN.md §4; only Response, RequestError and StateChange objects.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.directory import account_id_for
from tests.fuzz.conftest import (
    ADMIN_TOKEN,
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    CORE,
    MAIL,
    TARGETS,
    Target,
    basic,
    fuzz_seconds,
)

BATCH = settings(max_examples=20, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])
# The well-behaved client's thread draws masks from `random` meanwhile, which hypothesis would warn about.
pytestmark = [pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
              pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning"),
              # The budget, plus time to shrink a failure and to finish the last batch.
              pytest.mark.timeout(int(fuzz_seconds() / TARGETS) + 600)]
MESSAGE_LIMIT = 1_000_000  # GATEWAY_MAX_SIZE_REQUEST of the fuzzed gateway (conftest.py)
CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1013}  # DESIGN.md §4, RFC 6455 §7.4.1; never 1011
ERROR_TYPES = {f"urn:ietf:params:jmap:error:{t}" for t in
               ("notJSON", "notRequest", "limit", "unknownCapability", "serverUnavailable")}
SERVER_OBJECTS = {"Response", "RequestError", "StateChange"}
BOB_ACCOUNT = account_id_for(BOB)
TIMEOUT = 15.0


def budget() -> float:
    return fuzz_seconds() / TARGETS


# --- a raw socket client ------------------------------------------------------------------------------------

class Peer:
    """A blocking socket to the gateway that reads HTTP answers and WebSocket frames."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:  # the server may close while we still send (after its answer): allowed
            return False

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    def read_exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[int, dict[str, str], bytes] | None:
        """(status, headers, body) of the next HTTP answer; None when the server closed without one."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                assert not self.buf, f"a partial answer: {self.buf[:200]!r}"
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status = status_line.split(" ")[:2]
        assert version in ("HTTP/1.1", "HTTP/1.0"), status_line
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        body = b""
        if int(status) != 101:
            length = headers.get("content-length")
            assert length is not None, f"an answer without Content-Length: {status_line} {headers}"
            got = self.read_exactly(int(length))
            assert got is not None, "the body was cut"
            body = got
        return int(status), headers, body

    def read_frame(self) -> tuple[int, int, bytes] | None:
        """(opcode, rsv, payload) of the next server frame, None at end of stream."""
        first = self.read_exactly(2)
        if first is None:
            return None
        b0, b1 = first
        assert not b1 & 0x80, "a masked server frame"
        n = b1 & 0x7F
        if n >= 126:
            ext = self.read_exactly(2 if n == 126 else 8)
            assert ext is not None
            (n,) = struct.unpack("!H" if len(ext) == 2 else "!Q", ext)
        payload = self.read_exactly(n)
        assert payload is not None, "a frame was cut"
        return b0 & 0x0F, (b0 >> 4) & 7, payload


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bytes | None = b"\x11\x22\x33\x44"
          ) -> bytes:
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask is None or not payload:
        return head + (mask or b"") + payload
    key = (mask * (n // 4 + 1))[:n]
    return head + mask + (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(b"\x00\x00\xff\xff") else out  # RFC 7692 §7.2.1


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


KEY = base64.b64encode(b"fuzz-key-16bytes").decode()


def upgrade_head(port: int, authorization: str, deflate_offer: bool = False, query: str = "") -> bytes:
    lines = [f"GET /jmap/ws{query} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Protocol: jmap", f"Authorization: {authorization}"]
    if deflate_offer:
        lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def check_problem(t: Target, name: str, status: int, headers: dict[str, str], body: bytes) -> None:
    t.count(name, f"HTTP {status}")
    assert status < 500, f"HTTP {status}: {body[:300]!r}"
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/problem+json"), (status, headers)
        problem = json.loads(body)
        assert problem["status"] == status and isinstance(problem["title"], str), problem


def check_server_message(t: Target, name: str, payload: bytes) -> dict[str, Any]:
    msg = json.loads(payload)
    kind = msg.get("@type")
    assert kind in SERVER_OBJECTS, msg
    if kind == "RequestError":
        assert msg["type"] in ERROR_TYPES, msg
        assert "requestId" in msg, msg
        t.count(name, msg["type"].rsplit(":", 1)[1])
    else:
        t.count(name, kind)
    return msg  # type: ignore[no-any-return]


def check_close(t: Target, name: str, payload: bytes) -> None:
    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
    t.count(name, f"close {code}")
    assert code in CLOSE_CODES, f"close code {code} {payload[2:]!r}"


# --- hostile values ---------------------------------------------------------------------------------------------

def hostile_text(max_size: int = 64) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=max_size),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=max_size),
        st.sampled_from(["", "\u0000", "\ud7ff\ue000", "../..", "%2e%2e", "a" * 300, "\u202e", "${jndi:x}",
                         "'; DROP TABLE emails; --", BOB, BOB.upper(), BOB_ACCOUNT, "$seen", "*", "/", "~1~0",
                         "#ids", "Ω" * 100]),
    )


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), hostile_text())
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    hostile_text(12), inner, max_size=4), max_leaves=30)


class Raw:
    """JSON text spliced in as it is by encode() (nesting deeper than the json module can write)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:60]!r}... {len(self.text)} chars)"


@st.composite
def nested(draw: st.DrawFn) -> Raw:
    """Deep nesting, around the limit (64 in all: the arguments start at level 5) and far beyond it."""
    depth = draw(st.sampled_from([10, 55, 59, 60, 61, 64, 200, 5000, 20_000]))
    kinds = draw(st.sampled_from(["[]", "{}", "mixed"]))
    opens = "".join('{"k":' if kinds == "{}" or (kinds == "mixed" and i % 2) else "[" for i in range(depth))
    closes = "".join("}" if c == "{" else "]" for c in reversed(opens.replace('"k":', "")))
    return Raw(opens + json.dumps(draw(scalars)) + closes)


def filters(depth: int = 4) -> st.SearchStrategy[Any]:
    condition = st.dictionaries(st.sampled_from(["inMailbox", "text", "from", "subject", "hasKeyword", "before",
                                                 "minSize", "header", "bogus"]), json_values, max_size=3)
    return st.recursive(condition, lambda inner: st.fixed_dictionaries(
        {"operator": st.sampled_from(["AND", "OR", "NOT", "XOR"]), "conditions": st.lists(inner, max_size=4)}),
        max_leaves=12)


def arguments() -> st.SearchStrategy[dict[str, Any]]:
    account = st.sampled_from([BOB_ACCOUNT, account_id_for(ALICE), "nope"]) | hostile_text()
    patch = st.dictionaries(st.sampled_from(["keywords/$seen", "mailboxIds/x", "name", "a/b/c", "keywords",
                                             "keywords/$seen/x", "", "//", "~", "role"]) | hostile_text(20),
                            json_values, max_size=6)
    return st.fixed_dictionaries({}, optional={
        "accountId": account,
        "ids": st.none() | st.lists(hostile_text(20), max_size=5),
        "properties": st.none() | st.lists(hostile_text(20), max_size=5),
        "filter": filters() | json_values,
        "sort": st.lists(st.dictionaries(st.sampled_from(["property", "isAscending", "keyword"]), json_values),
                         max_size=3),
        "limit": scalars, "position": scalars, "anchor": scalars, "sinceState": scalars,
        "create": st.dictionaries(hostile_text(10), st.dictionaries(hostile_text(12), json_values, max_size=5),
                                  max_size=3),
        "update": st.dictionaries(hostile_text(10), patch, max_size=3),
        "destroy": st.lists(hostile_text(20), max_size=3),
        "#ids": st.fixed_dictionaries({"resultOf": st.sampled_from(["c0", "c1"]) | hostile_text(8),
                                       "name": st.sampled_from(["Email/query", "Core/echo"]),
                                       "path": st.sampled_from(["/ids", "/*", "/list/*/id", "/" + "a/" * 500,
                                                                "ids", ""]) | hostile_text(40)}),
        "deep": nested(),
        "big": st.sampled_from(["x" * 100_000, "é" * 50_000]),
    })


METHODS = ["Core/echo", "Mailbox/get", "Mailbox/query", "Mailbox/set", "Mailbox/changes", "Email/get",
           "Email/query", "Email/set", "Email/changes", "Email/queryChanges", "Thread/get", "Identity/get",
           "VacationResponse/get", "VacationResponse/set", "Nope/nope"]
CAPABILITIES = [CORE, MAIL, "urn:ietf:params:jmap:submission", "urn:ietf:params:jmap:vacationresponse", "urn:x"]


@st.composite
def client_messages(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["Request"] * 6 + ["WebSocketPushEnable", "WebSocketPushDisable", "junk"]))
    if kind == "Request":
        calls = draw(st.lists(st.tuples(st.sampled_from(METHODS) | hostile_text(20), arguments(),
                                        st.sampled_from(["c0", "c1", "c2"]) | hostile_text(8)), max_size=4))
        msg: dict[str, Any] = {"@type": "Request", "using": draw(st.lists(st.sampled_from(CAPABILITIES), max_size=4)),
                               "methodCalls": [list(c) for c in calls]}
        if draw(st.booleans()):
            msg["id"] = draw(hostile_text(20) | scalars)
        if draw(st.booleans()):
            msg["createdIds"] = draw(json_values)
        return msg
    if kind == "WebSocketPushEnable":
        return {"@type": kind, "dataTypes": draw(st.none() | st.lists(hostile_text(12)) | json_values),
                "pushState": draw(st.none() | hostile_text(80) | scalars)}
    if kind == "WebSocketPushDisable":
        return {"@type": kind}
    return draw(json_values | st.dictionaries(st.just("@type"), hostile_text(20)))


def encode(value: Any) -> bytes:
    raws: list[str] = []

    def splice(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\u0000raw{len(raws) - 1}\u0000"
        if isinstance(v, list):
            return [splice(x) for x in v]
        if isinstance(v, dict):
            return {k: splice(x) for k, x in v.items()}
        return v

    text = json.dumps(splice(value), ensure_ascii=False, allow_nan=False)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\u0000raw{i}\u0000"), raw)
    return text.encode("utf-8", "surrogatepass")


# --- target 1: HTTP heads (upgrades and plain requests) ---------------------------------------------------------

def header_lines(t: Target) -> st.SearchStrategy[list[tuple[str, str]]]:
    b64 = basic(BOB, BOB_PW).split()[1]
    auth = st.sampled_from([f"Basic {b64}", f"Basic {b64}\x01", f"Basic {b64[:-3]}", f"Bearer {t.jwt}",
                            f"Bearer {t.jwt}x", f"Bearer {ADMIN_TOKEN}", basic(ALICE, ALICE_PW), "Basic",
                            f"Basic {b64}{'A' * 9000}", f"Basic\x00{b64}", f"basic   {b64}", "Negotiate abc"])
    value = st.one_of(hostile_text(40), st.text(alphabet=st.characters(max_codepoint=255), max_size=40),
                      st.sampled_from(["websocket", "Upgrade", "keep-alive, Upgrade", "13", "8", KEY, "jmap",
                                       "permessage-deflate; client_max_window_bits=9; server_no_context_takeover",
                                       "permessage-deflate; x=1, permessage-deflate", "0", "5", "chunked",
                                       "a" * 20_000]))
    named = st.one_of(
        st.tuples(st.just("Authorization"), auth),
        st.tuples(st.sampled_from(["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
                                   "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "Content-Length",
                                   "Transfer-Encoding", "Cookie", "Origin", "Expect"]), value),
        st.tuples(hostile_text(20).map(lambda s: s.replace("\r", "").replace("\n", "")), value))
    return st.lists(named, max_size=12)


def http_heads(t: Target) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        method = draw(st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "OPTIONS", "PRI", "G\x01T", "get"]))
        path = draw(st.sampled_from(["/jmap/ws", "/jmap/ws", "/jmap/session", "/jmap/api", "/healthz",
                                     "/admin/events", f"/admin/delegations/{BOB}/{ALICE}", "/jmap/ws/ticket",
                                     "/.well-known/jmap", "/nope", "*", "http://x/jmap/ws", "/jmap/ws/../ws"]))
        query = draw(st.sampled_from(["", f"?ticket={t.ticket}", f"?ticket={t.ticket}x", "?ticket=", "?a=%zz"]))
        version = draw(st.sampled_from(["HTTP/1.1"] * 5 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", "http/1.1"]))
        headers = draw(header_lines(t))
        if draw(st.booleans()):  # the usual upgrade headers first, then the hostile ones
            headers = [("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                       ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13"),
                       ("Sec-WebSocket-Protocol", "jmap"), *headers]
        sep = draw(st.sampled_from(["\r\n"] * 8 + ["\n", "\r\n "]))
        head = f"{method} {path}{query} {version}{sep}" + "".join(f"{k}: {v}{sep}" for k, v in headers)
        filler = draw(st.sampled_from([0, 0, 0, 8_000, 16_300, 40_000]))
        if filler:
            head += f"X-Filler: {'f' * filler}{sep}"
        return head.encode("utf-8", "surrogatepass") + b"\r\n"

    return build()


def test_http_heads(target: Target) -> None:
    @BATCH
    @given(data=http_heads(target))
    def batch(data: bytes) -> None:
        target.examples["http_heads"] += 1
        peer = Peer(target.port)
        try:
            peer.send(data)
            if b"\r\n\r\n" not in data and not data.startswith(b"G\x01"):
                return  # an unfinished head: the server waits for the rest (HEAD_TIMEOUT), nothing to read
            answer = peer.read_head()
            if answer is None:
                target.count("http_heads", "closed without an answer")
                # Only for heads that are not HTTP/1.x at all could that be acceptable; it never is here.
                raise AssertionError(f"no answer to {data[:200]!r}")
            status, headers, body = answer
            if status == 101:
                target.count("http_heads", "HTTP 101")
                peer.send(frame(8, (1000).to_bytes(2, "big")))
                got = peer.read_frame()
                assert got is not None and got[0] == 8, got
                check_close(target, "http_heads", got[2])
                return
            check_problem(target, "http_heads", status, headers, body)
        finally:
            peer.close()
        target.check_process()

    target.run_for("http_heads", budget(), batch)


# --- target 2: WebSocket frame sequences -----------------------------------------------------------------------

@st.composite
def frame_sequences(draw: st.DrawFn, compressed: bool) -> tuple[list[bytes], bool]:
    frames: list[bytes] = []
    for _ in range(draw(st.integers(1, 8))):
        opcode = draw(st.sampled_from([1, 1, 1, 0, 2, 8, 9, 10, 3, 7, 11, 15]))
        kind = draw(st.sampled_from(["json", "json", "text", "bytes", "close", "big", "empty"]))
        if kind == "json":
            payload = encode(draw(client_messages()))
        elif kind == "text":
            payload = draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
        elif kind == "bytes":
            payload = draw(st.binary(max_size=300))
        elif kind == "close":
            payload = draw(st.integers(0, 65535)).to_bytes(2, "big") + draw(st.binary(max_size=130))
        elif kind == "big":
            payload = b'"' + b"x" * draw(st.sampled_from([125, 126, 65535, 65536, 200_000])) + b'"'
        else:
            payload = b""
        rsv = draw(st.sampled_from([0, 0, 0, 4, 2, 1, 7]))
        if compressed and draw(st.booleans()):
            payload, rsv = deflate(payload) if draw(st.booleans()) else draw(st.binary(max_size=64)), rsv | 4
        fin = draw(st.sampled_from([True, True, True, False]))
        mask = None if draw(st.integers(0, 19)) == 0 else b"\x0f\xf0\x55\xaa"
        frames.append(frame(opcode, payload, fin, rsv, mask))
    return frames, draw(st.booleans())  # and: all in one write, or one write per frame


def read_until_closed(t: Target, name: str, peer: Peer, compressed: bool) -> None:
    while True:
        got = peer.read_frame()
        if got is None:
            t.count(name, "end of stream")
            return
        opcode, rsv, payload = got
        if opcode == 8:
            check_close(t, name, payload)
            return
        assert opcode in (1, 9, 10), f"server opcode {opcode}"
        if opcode == 1:
            assert rsv in (0, 4) and (compressed or rsv == 0), rsv
            check_server_message(t, name, inflate(payload) if rsv & 4 else payload)


def frames_batch(target: Target, compressed: bool) -> Any:
    name = "frames_deflate" if compressed else "frames"

    @BATCH
    @given(seq=frame_sequences(compressed))
    def batch(seq: tuple[list[bytes], bool]) -> None:
        target.examples[name] += 1
        frames, one_write = seq
        peer = Peer(target.port)
        try:
            peer.send(upgrade_head(target.port, basic(BOB, BOB_PW), compressed))
            answer = peer.read_head()
            assert answer is not None and answer[0] == 101, answer
            assert compressed == ("sec-websocket-extensions" in answer[1])
            data = [*frames, frame(8, (1000).to_bytes(2, "big"))]
            if one_write:
                peer.send(b"".join(data))
            else:
                for f in data:
                    if not peer.send(f):
                        break
            read_until_closed(target, name, peer, compressed)
        finally:
            peer.close()

    return batch


def test_websocket_frames(target: Target) -> None:
    target.run_for("frames", budget() / 2, frames_batch(target, False))


def test_websocket_frames_with_deflate(target: Target) -> None:
    target.run_for("frames_deflate", budget() / 2, frames_batch(target, True))


# --- target 3: JMAP client messages, on the socket and over HTTP ---------------------------------------------

def test_jmap_messages(target: Target) -> None:
    state: dict[str, Any] = {"peer": None, "n": 0}

    def socket_peer() -> Peer:
        if state["peer"] is None:
            peer = Peer(target.port)
            peer.send(upgrade_head(target.port, basic(BOB, BOB_PW)))
            answer = peer.read_head()
            assert answer is not None and answer[0] == 101, answer
            state["peer"] = peer
        return state["peer"]  # type: ignore[no-any-return]

    @BATCH
    @given(msg=client_messages(), over_http=st.booleans())
    def batch(msg: Any, over_http: bool) -> None:
        target.examples["jmap_messages"] += 1
        payload = encode(msg)
        if over_http:
            body = payload if not isinstance(msg, dict) else encode({k: v for k, v in msg.items() if k != "@type"})
            peer = Peer(target.port)
            try:
                peer.send(f"POST /jmap/api HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(ALICE, ALICE_PW)}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                          "\r\n".encode() + body)
                answer = peer.read_head()
                assert answer is not None, "no answer"
                check_problem(target, "jmap_http", *answer)
                if answer[0] == 200:
                    assert "methodResponses" in json.loads(answer[2])
            finally:
                peer.close()
            return
        # On the socket: the message, then a sentinel request; everything up to the sentinel's answer must be
        # within the vocabulary, and the socket must stay open (a text message never closes it, unless it is
        # over the size limit: 1009).
        too_big = len(payload) > MESSAGE_LIMIT
        state["n"] += 1
        sentinel = f"sentinel-{state['n']}"
        peer = socket_peer()
        peer.send(frame(1, payload) + frame(1, encode({"@type": "Request", "id": sentinel, "using": [CORE],
                                                       "methodCalls": [["Core/echo", {}, "s"]]})))
        while True:
            got = peer.read_frame()
            assert got is not None, "the socket was closed"
            opcode, _, body = got
            if opcode == 8:
                state["peer"] = None
                peer.close()
                check_close(target, "jmap_socket", body)
                if too_big and body[:2] == (1009).to_bytes(2, "big"):
                    return
                raise AssertionError(f"a text message closed the socket: {body!r}")
            if opcode != 1:
                continue
            message = check_server_message(target, "jmap_socket", body)
            if message.get("requestId") == sentinel:
                return

    try:
        target.run_for("jmap_messages", budget(), batch)
    finally:
        if state["peer"] is not None:
            state["peer"].close()


# --- target 4: James bus messages through POST /admin/events --------------------------------------------------

@st.composite
def bus_messages(draw: st.DrawFn) -> bytes:
    def event() -> Any:
        return draw(st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["org.apache.james.jmap.change.StateChangeEvent"] * 4 + ["Other"]) | scalars,
            "eventId": hostile_text(40) | scalars,
            "username": st.sampled_from([BOB, ALICE, BOB.upper(), ""]) | hostile_text(300) | scalars,
            "typeStates": st.dictionaries(st.sampled_from(["Email", "Mailbox", "EmailDelivery", "Thread"])
                                          | hostile_text(30), hostile_text(60) | scalars, max_size=6) | json_values,
            "mailboxState": hostile_text(20) | scalars, "emailState": hostile_text(20),
        }))

    def valid() -> Any:
        # A well-formed event for a user with sessions (the well-behaved client is Bob's): hostile states and
        # type names, which reach the fan-out and the push of that client.
        return {"type": "org.apache.james.jmap.change.StateChangeEvent", "eventId": draw(hostile_text(40)),
                "username": draw(st.sampled_from([BOB, ALICE])),
                "typeStates": draw(st.dictionaries(st.sampled_from(["Email", "Mailbox", "EmailDelivery"])
                                                   | hostile_text(30), hostile_text(200), max_size=6))}

    shape = draw(st.sampled_from(["valid", "valid", "one", "many", "many", "junk", "bytes", "deep"]))
    if shape == "valid":
        return encode([valid() for _ in range(draw(st.integers(1, 3)))])
    if shape == "one":
        return encode(event())
    if shape == "many":
        return encode([event() for _ in range(draw(st.integers(0, 20)))])
    if shape == "deep":
        return encode(draw(nested()))  # a Raw at the top
    if shape == "junk":
        return encode(draw(json_values))
    return draw(st.binary(max_size=200))


def test_bus_messages(target: Target) -> None:
    @BATCH
    @given(body=bus_messages(), token=st.sampled_from([ADMIN_TOKEN] * 5 + [ADMIN_TOKEN + "x", ""]))
    def batch(body: bytes, token: str) -> None:
        target.examples["bus_messages"] += 1
        peer = Peer(target.port)
        try:
            peer.send(f"POST /admin/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                      "\r\n".encode() + body)
            answer = peer.read_head()
            assert answer is not None, "no answer"
            status, headers, payload = answer
            check_problem(target, "bus_messages", status, headers, payload)
            assert status in (202, 400, 401, 403, 413), status
        finally:
            peer.close()

    target.run_for("bus_messages", budget(), batch)


@st.composite
def ingest_streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """An NDJSON event stream as the ingest protocol reads it (its head, its framing, its lines), and how many
    lines it carries: chunked with lines cut anywhere, hostile chunk headers and trailers, a Content-Length that
    is right or wrong, or both framings at once."""
    lines = [draw(bus_messages()).replace(b"\n", b" ") + b"\n" for _ in range(draw(st.integers(0, 6)))]
    body = b"".join(lines)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    framing = draw(st.sampled_from(["chunked", "chunked", "chunked", "length", "wrong-length", "both"]))
    head = ("POST /admin/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + draw(
        st.sampled_from([ADMIN_TOKEN] * 6 + [ADMIN_TOKEN + "x", ""])) + "\r\nContent-Type: application/x-ndjson"
        + draw(st.sampled_from(["", "; charset=utf-8"])) + "\r\n")
    if framing in ("length", "wrong-length"):
        length = len(body) + (draw(st.integers(-20, 20)) if framing == "wrong-length" else 0)
        return (head + f"Content-Length: {max(0, length)}\r\n\r\n").encode() + body, len(lines)
    head += "Transfer-Encoding: chunked\r\n" + ("Content-Length: 10\r\n" if framing == "both" else "") + "\r\n"
    out = bytearray(head.encode())
    for piece in pieces:
        size = draw(st.sampled_from([b"%x", b"%X", b"%x;ext=1", b"%x ", b"-%x", b"0x%x", b"%020x"])) % len(piece)
        out += size + b"\r\n" + piece + draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"", b"xx\r\n"]))
    out += draw(st.sampled_from([b"0\r\n\r\n"] * 4 + [b"0\r\nX-Trailer: 1\r\n\r\n", b"0\r\n", b"", b"zz\r\n"]))
    return bytes(out), len(lines)


def test_ingest_streams(target: Target) -> None:
    @BATCH
    @given(stream=ingest_streams())
    def batch(stream: tuple[bytes, int]) -> None:
        data, lines = stream
        target.examples["ingest_streams"] += 1
        peer = Peer(target.port)
        try:
            peer.send(data)
            peer.sock.shutdown(socket.SHUT_WR)  # a stream cut short is answered, not waited for
            answer = peer.read_head()
            assert answer is not None, "no answer"
            status, headers, payload = answer
            check_problem(target, "ingest_streams", status, headers, payload)
            assert status in (202, 400, 401, 403, 413), status
            assert headers.get("connection") == "close", headers
            if status == 202:
                assert json.loads(payload)["accepted"] <= 3 * lines  # a line holds at most an array of 3
        finally:
            peer.close()

    target.run_for("ingest_streams", budget(), batch)


assert os.environ.get("FUZZ_SECONDS", "60").replace(".", "", 1).isdigit(), "FUZZ_SECONDS must be a number"
