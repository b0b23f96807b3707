"""The picows listener: translates frames and socket events of one WebSocket into session and hub calls.

Frames go through the coalescer (reassembly, UTF-8, size limit, rsv rules), complete messages through the
sans-I/O `JmapSession`, and the resulting actions are performed here: replies written, requests run as tasks
on the request path, push enabled or disabled on the hub, the socket closed with the right code.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from gateway.directory import Principal
from gateway.errors import SERVER_UNAVAILABLE, Close, RequestLevelError
from gateway.session import CloseWith, EnablePush, JmapSession, Reply, Run

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

_MSG_TYPES = {m.value: m for m in WSMsgType}
PING_PAYLOAD = b"jmap-gw"
_NO_HEADERS: Any = ()


class Connection(WSListener):
    """One authenticated WebSocket. Small on purpose: idle connections are most of a gateway's memory."""

    __slots__ = (
        "_closing", "_expiry", "coalescer", "deflate", "gw", "inflater_bits", "last_seen", "paused_since",
        "pinged_at", "principal", "session", "target", "transport",
    )

    def __init__(self, gw: Gateway, principal: Principal, deflate: Any = None) -> None:
        self.gw = gw
        self.principal = principal
        self.deflate = deflate  # negotiated DeflateParams, or None
        self.transport: WSTransport | None = None
        self.session = JmapSession(gw.supported_capabilities, gw.settings.max_calls_in_request,
                                   gw.settings.max_concurrent_requests, gw.settings.max_json_depth)
        self.coalescer = gw.coalesce.Coalescer(gw.settings.message_limit, deflate is not None)
        self.target: Any = None
        self.last_seen = 0.0
        self.pinged_at = 0.0
        self.paused_since = 0.0
        self._closing = False
        self._expiry: asyncio.TimerHandle | None = None

    # --- picows callbacks ----------------------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # picows keeps the upgrade request and response for the socket's lifetime; their header maps are ~2 KiB
        # per idle connection that nothing reads after the handshake.
        for kept in (transport.request, transport.response):
            if kept is not None:
                kept.headers = _NO_HEADERS
        gw = self.gw
        transport.underlying_transport.set_write_buffer_limits(high=gw.settings.write_high_water)
        if gw.settings.socket_sndbuf:
            sock = transport.underlying_transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, gw.settings.socket_sndbuf)
        # The shared compressor uses a 32 KiB window: a peer that limited ours (server_max_window_bits < 15)
        # gets plain frames, which RFC 7692 §6 allows for any message.
        compress = self.deflate is not None and self.deflate.server_max_window_bits == 15
        self.target = gw.broadcast.Target(transport, compress)
        self.last_seen = gw.loop.time()
        gw.connection_opened(self)
        exp = self.principal.expires_at
        if exp is not None:
            # A token that expires while the socket is open closes it at the expiry (policy violation).
            self._expiry = gw.loop.call_later(max(0.0, exp - time.time()), self.close,
                                              Close.POLICY_VIOLATION, "token expired")
        gw.schedule_keepalive(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self.gw.hub.disable(self.target)
        self.gw.connection_closed(self)

    def pause_writing(self) -> None:
        # The socket's write buffer passed its high-water mark: pushes now merge instead of queueing.
        self.target.paused = True
        self.paused_since = self.gw.loop.time()
        self.gw.schedule_slow_check(self)

    def resume_writing(self) -> None:
        self.target.paused = False
        self.paused_since = 0.0
        self.gw.hub.flush(self.target)

    def is_user_specific_pong(self, frame: WSFrame) -> bool:
        return False

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.last_seen = self.gw.loop.time()
        op = frame.msg_type
        if op == WSMsgType.PONG:
            self.pinged_at = 0.0
            return
        rsv = (frame.rsv1 << 2) | (frame.rsv2 << 1) | frame.rsv3
        c = self.coalescer
        status = c.feed(op.value, frame.fin, rsv, frame.get_payload_as_memoryview())
        if op == WSMsgType.CLOSE and status != 3:
            self._on_close_frame(transport, frame.get_payload_as_bytes())
            return
        if status == 0 or status == 2:  # PENDING, or a PING that picows already answered
            return
        if status == 3:
            self.close(c.error_code, c.error_reason)
            return
        payload = c.take()
        opcode = c.opcode
        if c.rsv1:
            payload = self.gw.inflate(self, payload)
            if payload is None:
                return
        self.gw.metrics.message_in()
        self.on_message(opcode, payload)

    def on_message(self, opcode: int, payload: bytes) -> None:
        """A complete, inflated, validated message: the JMAP session decides what happens."""
        action = self.session.receive(opcode, payload)
        if isinstance(action, Run):
            self.gw.run_request(self, action)
        elif isinstance(action, Reply):
            self.gw.metrics.request_error_sent(action.payload)
            self.send(action.payload)
        elif isinstance(action, EnablePush):
            self.gw.enable_push(self, action)
        elif isinstance(action, CloseWith):
            self.close(action.code, action.reason)
        else:
            self.gw.hub.disable(self.target)

    def _on_close_frame(self, transport: WSTransport, payload: bytes) -> None:
        """RFC 6455 §5.5.1: answer a close frame with one (echoing its code) and end the connection."""
        if not payload:
            code = 1005  # no status code: answered with 1000
            reply = Close.NORMAL
        else:
            code = int.from_bytes(payload[:2], "big")
            if not valid_close_code(code):
                # RFC 6455 §7.4: 0-999, 1004-1006, 1015 and the unassigned ranges must not appear on the wire.
                self.close(Close.PROTOCOL_ERROR, "invalid close code")
                return
            reply = code
        self.gw.metrics.close(code)
        # picows takes any integer where it declares its enum (a Cython cpdef enum), so 3000-4999 echo as they are.
        transport.send_close(reply)  # type: ignore[arg-type]
        transport.disconnect()

    # --- actions -------------------------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        transport = self.transport
        if transport is None or self._closing:
            return
        self.gw.send_message(self, payload)
        if self.target.paused:
            # Responses are never dropped, but a socket that does not read may not hold unbounded memory.
            buffered = transport.underlying_transport.get_write_buffer_size()
            if buffered > self.gw.settings.slow_client_max_bytes:
                self.close(Close.TRY_AGAIN_LATER, "too much unread data")

    def finish(self, request_id: str | None, result: Any) -> None:
        self.send(self.session.finish(request_id, result))

    def close(self, code: int, reason: str = "") -> None:
        transport = self.transport
        if transport is None or self._closing:
            return
        self._closing = True
        self.gw.metrics.close(code)
        self.gw.hub.disable(self.target)
        transport.send_close(WSCloseCode(code), reason.encode()[:120])
        # Give the close frame a moment to leave, then drop the socket even if the peer never answers.
        transport.disconnect(graceful=True)
        self.gw.loop.call_later(2.0, transport.underlying_transport.abort)

    @property
    def closing(self) -> bool:
        return self._closing or self.transport is None or self.transport.is_disconnected


def valid_close_code(code: int) -> bool:
    """RFC 6455 §7.4.1-7.4.2 and the IANA registry: the codes a peer may send in a close frame."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def server_unavailable(detail: str) -> RequestLevelError:
    return RequestLevelError(SERVER_UNAVAILABLE, detail, status=503)
