"""RFC 8620 §7.3 push over an event-source resource (Server-Sent Events), sans I/O: the request's variables, the
framing of `state` and `ping` events, and the stream's deadlines (pings, expiry, a client that does not read).

The transport (gateway.transport.sse) performs what this decides; the hub writes `state` events through the same
fan-out index as WebSocket pushes, from the same encoded StateChange.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import quote

import msgspec

from gateway.errors import HTTPProblem

STATE_PREFIX = b"event: state\ndata: "
NEVER = float("inf")
# RFC 8620 §7.3 lets the server clamp the ping interval (the ping's data says which it uses). The floor keeps a
# client from making the server wake up for it every second; the ceiling keeps idle proxies from dropping it.
MIN_PING = 5
MAX_PING = 3600


class StreamRequest(msgspec.Struct, frozen=True):
    """The variables of `eventSourceUrl` (RFC 8620 §7.3). `types` None = "*" (every type)."""

    types: frozenset[str] | None
    close_after_state: bool
    ping: int  # seconds, 0 = no pings


def parse_request(query: Mapping[str, Sequence[str]]) -> StreamRequest:
    """The variables from a parsed query string; HTTPProblem(400) when one is not as the RFC requires."""
    def one(name: str, default: str) -> str:
        values = query.get(name)
        return values[0] if values else default

    raw_types = one("types", "*")
    if raw_types == "*":
        types = None
    else:
        names = [t.strip() for t in raw_types.split(",")]
        if not raw_types or any(not n for n in names):
            raise HTTPProblem(400, 'types must be "*" or a comma-separated list of type names (RFC 8620 §7.3).')
        types = frozenset(names)
    close_after = one("closeafter", "no")
    if close_after not in ("state", "no"):
        raise HTTPProblem(400, 'closeafter must be "state" or "no" (RFC 8620 §7.3).')
    raw_ping = one("ping", "0")
    if not raw_ping.isascii() or not raw_ping.isdigit():
        raise HTTPProblem(400, "ping must be a non-negative integer of seconds (RFC 8620 §7.3).")
    ping = int(raw_ping)
    if ping:
        ping = min(max(ping, MIN_PING), MAX_PING)
    return StreamRequest(types, close_after == "state", ping)


_TEMPLATE_VAR = re.compile(r"\{([A-Za-z0-9_]+)\}")


def stream_url(template: str, types: str = "*", close_after: str = "no", ping: int = 0) -> str:
    """A client's request URL from an `eventSourceUrl` (RFC 8620 §7.3): a level-1 URI template (RFC 6570) with the
    variables types, closeafter and ping; unknown ones expand empty. Values are percent-encoded except `*` and `,`,
    which a query may hold as they are (RFC 3986 §3.4): a server that does not decode its query still reads
    `types=*`, one that does reads the same."""
    values = {"types": types, "closeafter": close_after, "ping": str(ping)}
    return _TEMPLATE_VAR.sub(lambda m: quote(values.get(m.group(1), ""), safe="*,"), template)


def state_event(state_change_json: bytes | memoryview, push_state: str) -> bytes:
    """A `state` event: the StateChange as data (one line: the JSON has no newline), its pushState as the event's
    id, so that the browser's reconnection (Last-Event-ID) resumes where it stopped."""
    return b"".join((STATE_PREFIX, state_change_json, b"\nid: ", push_state.encode("ascii"), b"\n\n"))


def ping_event(interval: int) -> bytes:
    """RFC 8620 §7.3: a `ping` event whose data says the interval in use."""
    return b'event: ping\ndata: {"interval":%d}\n\n' % interval


def response_head(extra: Mapping[str, str] | None = None) -> bytes:
    """The answer's head. The body ends when the connection does (no length, no chunks: RFC 9112 §6.3), which every
    EventSource client reads; proxies are asked not to buffer it."""
    lines = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Cache-Control: no-cache",
             "Connection: close", "X-Accel-Buffering: no", *(f"{k}: {v}" for k, v in (extra or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class StreamState:
    """The deadlines of one event stream: pings (RFC 8620 §7.3, counted from the last event sent), the
    credentials' expiry, and how long the socket may stay paused. All times on the caller's clock."""

    __slots__ = ("closing", "expires_at", "last_sent", "paused_since", "ping", "slow_timeout")

    def __init__(self, ping: int, now: float, *, expires_at: float | None, slow_timeout: float) -> None:
        self.ping = ping
        self.last_sent = now
        self.expires_at = expires_at
        self.slow_timeout = slow_timeout
        self.paused_since = 0.0
        self.closing = False

    @property
    def deadline(self) -> float:
        if self.closing:
            return NEVER
        due = NEVER if self.expires_at is None else self.expires_at
        if self.paused_since:
            due = min(due, self.paused_since + self.slow_timeout)
        if self.ping:
            due = min(due, self.last_sent + self.ping)
        return due

    def timer(self, now: float) -> str | None:
        """What is due: "expired", "slow" (close), "ping" (send one), or None."""
        if self.closing:
            return None
        if self.expires_at is not None and now >= self.expires_at:
            self.closing = True
            return "expired"
        if self.paused_since and now >= self.paused_since + self.slow_timeout:
            self.closing = True
            return "slow"
        if self.ping and now >= self.last_sent + self.ping:
            self.last_sent = now
            return "ping"
        return None

    def sent(self, now: float) -> None:
        self.last_sent = now
