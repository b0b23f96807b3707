"""The core of one WebSocket connection, sans I/O: frames and the time in, actions out (RFC 6455 + RFC 8887 §4).

A `Session` owns everything one connection decides by itself: frame reassembly and its limits (through the
coalescer), inflation (RFC 7692), the close handshake and close codes, JMAP message decoding and routing,
request admission and in-flight counting (`maxConcurrentRequests`), keepalive pings and pong deadlines, the
token's expiry, and the slow-client limits. It never reads a clock: every input carries `now` (the loop's
monotonic time), and `deadline` says when it next wants `timer(now)`. The transport adapter performs the actions.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from gateway.admission import check_request, too_many_in_flight
from gateway.errors import Close, ProtocolViolation, RequestLevelError, request_error_of
from gateway.jmap.codec import DEFAULT_MAX_DEPTH, decode_client, encoder
from gateway.jmap.types import ApiRequest, ApiResponse, Request, Response, WebSocketPushDisable, WebSocketPushEnable

# RFC 6455 §5.2 opcodes, and the coalescer's answers to a frame.
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
PENDING, MESSAGE, CONTROL, ERROR = 0, 1, 2, 3
NEVER = float("inf")


class Reply:
    """Send `payload` (a complete text message) now; `error` is the RequestError type it carries, if any."""

    __slots__ = ("error", "payload")

    def __init__(self, payload: bytes, error: str | None = None) -> None:
        self.payload = payload
        self.error = error


class Run:
    """Run `request` on the request path, then give the result to `Session.finish`."""

    __slots__ = ("request", "request_id")

    def __init__(self, request: ApiRequest, request_id: str | None) -> None:
        self.request = request
        self.request_id = request_id


class EnablePush:
    """RFC 8887 §4.3.5.2. `data_types` None = all types; an empty set = none."""

    __slots__ = ("data_types", "push_state")

    def __init__(self, data_types: frozenset[str] | None, push_state: str | None) -> None:
        self.data_types = data_types
        self.push_state = push_state


class DisablePush:
    """RFC 8887 §4.3.5.3 (also what a closing connection does)."""

    __slots__ = ()


class Ping:
    """Send a keepalive ping."""

    __slots__ = ()


class CloseWith:
    """Send a close frame with `code` and end the connection; `echo` answers the peer's close frame (RFC 6455
    §5.5.1), `abort` drops the socket right after (a client that does not read would never take the frame)."""

    __slots__ = ("abort", "code", "echo", "reason")

    def __init__(self, code: int, reason: str, *, echo: bool = False, abort: bool = False) -> None:
        self.code = code
        self.reason = reason
        self.echo = echo
        self.abort = abort


class Echo:
    """Send `payload` back with its opcode (only the echo tool's sessions produce it)."""

    __slots__ = ("opcode", "payload")

    def __init__(self, opcode: int, payload: bytes) -> None:
        self.opcode = opcode
        self.payload = payload


Action = Reply | Run | EnablePush | DisablePush | Ping | CloseWith | Echo
DISABLE = DisablePush()
PING_NOW = Ping()


class Limits:
    """What the settings fix for every connection of a process."""

    __slots__ = ("max_calls", "max_concurrent", "max_depth", "ping_interval", "ping_timeout", "slow_max_bytes",
                 "slow_timeout")

    def __init__(self, *, max_calls: int, max_concurrent: int, ping_interval: float, ping_timeout: float,
                 slow_timeout: float, slow_max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.max_calls = max_calls
        self.max_concurrent = max_concurrent
        self.ping_interval = ping_interval  # 0 = no pings
        self.ping_timeout = ping_timeout
        self.slow_timeout = slow_timeout
        self.slow_max_bytes = slow_max_bytes
        self.max_depth = max_depth  # GATEWAY_MAX_JSON_DEPTH


def valid_close_code(code: int) -> bool:
    """RFC 6455 §7.4.1-7.4.2 and the IANA registry: the codes a peer may send in a close frame."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class Session:
    """The protocol state of one authenticated WebSocket connection."""

    __slots__ = ("_coalescer", "_inflate", "_limits", "_supported", "_utf8_valid", "closing", "expires_at",
                 "in_flight", "last_seen", "paused_since", "pinged_at")

    def __init__(self, limits: Limits, supported: Collection[str], coalescer: Any, *, now: float,
                 expires_at: float | None = None, inflate: Callable[[bytes], bytes] | None = None,
                 utf8_valid: Callable[[bytes], bool] | None = None) -> None:
        """`coalescer` reassembles frames (gateway._coalesce); `inflate` undoes RFC 7692 compression (raising
        ProtocolViolation) when it was negotiated; `expires_at` is when the credentials expire, on `now`'s clock."""
        self._limits = limits
        self._supported = supported
        self._coalescer = coalescer
        self._inflate = inflate
        self._utf8_valid = utf8_valid
        self.expires_at = expires_at
        self.in_flight = 0
        self.last_seen = now
        self.pinged_at = 0.0
        self.paused_since = 0.0
        self.closing = False

    # --- frames in ---------------------------------------------------------------------------------------

    def frame(self, opcode: int, fin: bool, rsv: int, payload: Any, now: float) -> Action | None:
        """One frame from the peer (a PING is already answered by the transport). Never raises for bad input."""
        self.last_seen = now
        if self.closing:
            return None
        if opcode == PONG:
            self.pinged_at = 0.0
            return None
        c = self._coalescer
        status = c.feed(opcode, fin, rsv, payload)
        if status == ERROR:
            return self.close(c.error_code, c.error_reason)
        if opcode == CLOSE:
            return self._close_frame(bytes(payload))
        if status != MESSAGE:
            return None  # PENDING (more frames to come) or CONTROL (a ping)
        data = c.take()
        kind = c.opcode
        if c.rsv1:
            if self._inflate is None:  # the coalescer refuses rsv1 unless deflate was negotiated
                return self.close(Close.PROTOCOL_ERROR, "rsv1 without permessage-deflate")
            try:
                # The size limit applies to the inflated message and is enforced while inflating (no bomb).
                data = self._inflate(data)
            except ProtocolViolation as exc:
                return self.close(exc.code, exc.reason)
            if kind == TEXT and self._utf8_valid is not None and not self._utf8_valid(data):
                return self.close(Close.INVALID_TEXT, "invalid UTF-8 in a text message")
        return self.message(kind, data)

    def _close_frame(self, payload: bytes) -> CloseWith:
        """RFC 6455 §5.5.1: answer a close frame with one (echoing its code) and end the connection."""
        self.closing = True
        if not payload:
            return CloseWith(Close.NORMAL, "", echo=True)  # no status code (1005): answered with 1000
        code = int.from_bytes(payload[:2], "big")
        if not valid_close_code(code):
            # RFC 6455 §7.4: 0-999, 1004-1006, 1015 and the unassigned ranges must not appear on the wire.
            return CloseWith(Close.PROTOCOL_ERROR, "invalid close code")
        return CloseWith(code, "", echo=True)

    # --- messages ------------------------------------------------------------------------------------------

    def message(self, opcode: int, payload: bytes) -> Action:
        """One complete, inflated, validated message (RFC 8887 §4.3)."""
        if opcode != TEXT:
            # RFC 8887 §4.2: JMAP messages are text; DESIGN.md §4: a binary frame closes with 1003.
            return self.close(Close.UNSUPPORTED_DATA, "binary messages are not supported")
        try:
            message = decode_client(payload, self._limits.max_depth)
        except RequestLevelError as exc:
            return self._refuse(exc, exc.request_id)
        if isinstance(message, Request):
            return self._request(message)
        if isinstance(message, WebSocketPushEnable):
            # DESIGN.md §4: null or absent = all types; [] = none; unknown names are simply never matched.
            types = None if message.dataTypes is None else frozenset(message.dataTypes)
            return EnablePush(types, message.pushState)
        if isinstance(message, WebSocketPushDisable):
            return DISABLE
        raise AssertionError("unreachable: the decoder only yields client messages")

    def _request(self, message: Request) -> Action:
        api = message.to_api()
        try:
            check_request(api, self._supported, self._limits.max_calls)
        except RequestLevelError as exc:
            return self._refuse(exc, message.id)
        if self.in_flight >= self._limits.max_concurrent:
            return self._refuse(too_many_in_flight(self._limits.max_concurrent, "on one connection"), message.id)
        self.in_flight += 1
        return Run(api, message.id)

    def _refuse(self, exc: RequestLevelError, request_id: str | None) -> Reply:
        error = request_error_of(exc, request_id)
        return Reply(encoder.encode(error), error.type)

    def finish(self, request_id: str | None, result: ApiResponse | BaseException) -> Reply:
        """The message for a finished request (RFC 8887 §4.3.2 Response or §4.3.4 RequestError)."""
        self.in_flight -= 1
        if isinstance(result, BaseException):
            error = request_error_of(result, request_id)
            return Reply(encoder.encode(error), error.type)
        return Reply(encoder.encode(Response(methodResponses=result.methodResponses, sessionState=result.sessionState,
                                             createdIds=result.createdIds, requestId=request_id)))

    # --- time, writes and the end ------------------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """When `timer` should next be called (NEVER when nothing is due)."""
        if self.closing:
            return NEVER
        lim = self._limits
        due = NEVER if self.expires_at is None else self.expires_at
        if self.paused_since:
            due = min(due, self.paused_since + lim.slow_timeout)
        if self.pinged_at:
            due = min(due, self.pinged_at + lim.ping_timeout)
        elif lim.ping_interval > 0:
            due = min(due, self.last_seen + lim.ping_interval)
        return due

    def timer(self, now: float) -> Action | None:
        """What is due at `now`: closing an expired or stalled connection, or a keepalive ping."""
        if self.closing:
            return None
        lim = self._limits
        if self.expires_at is not None and now >= self.expires_at:
            # A token that expires while the socket is open closes it (policy violation).
            return self.close(Close.POLICY_VIOLATION, "token expired")
        if self.paused_since and now >= self.paused_since + lim.slow_timeout:
            return self.close(Close.TRY_AGAIN_LATER, "the client does not read", abort=True)
        if self.pinged_at:
            if self.last_seen > self.pinged_at:
                self.pinged_at = 0.0  # any frame since the ping proves the peer is alive
            elif now >= self.pinged_at + lim.ping_timeout:
                return self.close(Close.GOING_AWAY, "no pong within the ping timeout")
            else:
                return None
        if lim.ping_interval > 0 and now - self.last_seen >= lim.ping_interval:
            self.pinged_at = now
            return PING_NOW
        return None

    def paused(self, now: float) -> None:
        """The socket's write buffer passed its high-water mark (pushes merge from now on)."""
        if not self.paused_since:
            self.paused_since = now

    def resumed(self) -> None:
        self.paused_since = 0.0

    def wrote_reply(self, buffered: int) -> Action | None:
        """A reply was written and `buffered` bytes wait in the socket: responses are never dropped, but a socket
        that does not read may not hold unbounded memory."""
        if self.paused_since and buffered > self._limits.slow_max_bytes:
            return self.close(Close.TRY_AGAIN_LATER, "too much unread data")
        return None

    def close(self, code: int, reason: str, *, abort: bool = False) -> CloseWith | DisablePush:
        """Close with `code` (RFC 6455 §7.4.1); once closing, only stop pushing (DISABLE is harmless)."""
        if self.closing:
            return DISABLE
        self.closing = True
        return CloseWith(code, reason, abort=abort)


class EchoSession(Session):
    """A session that sends every message back (the echo tool, for conformance suites): the gateway's own frame,
    close and inflate rules, without JMAP."""

    __slots__ = ()

    def message(self, opcode: int, payload: bytes) -> Action:
        return Echo(opcode, payload)

