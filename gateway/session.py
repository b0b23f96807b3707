"""Per-connection JMAP-over-WebSocket protocol logic (RFC 8887 §4), as a sans-I/O object.

A `JmapSession` takes complete messages (after frame reassembly) and returns what should happen: bytes to send,
a request to run, push to enable or disable, or a close code. It owns the per-connection request accounting
(`maxConcurrentRequests`). No I/O and no clock here; the transport adapter performs the actions.
"""

from __future__ import annotations

from collections.abc import Collection

from gateway.errors import LIMIT, Close, RequestLevelError
from gateway.jmap.codec import DEFAULT_MAX_DEPTH, decode_client, encoder, request_id_of
from gateway.jmap.types import (
    ApiRequest,
    ApiResponse,
    Request,
    Response,
    WebSocketPushDisable,
    WebSocketPushEnable,
)
from gateway.upstream.base import check_request

TEXT = 1
BINARY = 2


class Reply:
    """Send `payload` (a complete text message) now."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class Run:
    """Run `request` on the request path, then give the result to `JmapSession.finish`."""

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
    """RFC 8887 §4.3.5.3."""

    __slots__ = ()


class CloseWith:
    """Close the connection with `code` (RFC 6455 §7.4.1)."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


Action = Reply | Run | EnablePush | DisablePush | CloseWith
DISABLE = DisablePush()


class JmapSession:
    """The protocol state of one authenticated WebSocket connection."""

    __slots__ = ("_max_calls", "_max_concurrent", "_max_depth", "_supported", "in_flight")

    def __init__(self, supported_capabilities: Collection[str], max_calls_in_request: int,
                 max_concurrent_requests: int, max_json_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self._supported = supported_capabilities
        self._max_calls = max_calls_in_request
        self._max_concurrent = max_concurrent_requests
        self._max_depth = max_json_depth
        self.in_flight = 0

    def receive(self, opcode: int, payload: bytes) -> Action:
        """Handle one complete message. Never raises for bad input."""
        if opcode != TEXT:
            # RFC 8887 §4.2: JMAP messages are text; DESIGN.md §4: a binary frame closes with 1003.
            return CloseWith(Close.UNSUPPORTED_DATA, "binary messages are not supported")
        try:
            message = decode_client(payload, self._max_depth)
        except RequestLevelError as exc:
            return Reply(encoder.encode(exc.to_request_error(request_id_of(exc))))
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
            check_request(api, self._supported, self._max_calls)
        except RequestLevelError as exc:
            return Reply(encoder.encode(exc.to_request_error(message.id)))
        if self.in_flight >= self._max_concurrent:
            limit = RequestLevelError(
                LIMIT, f"At most {self._max_concurrent} requests may be in flight on one connection.",
                limit="maxConcurrentRequests")
            return Reply(encoder.encode(limit.to_request_error(message.id)))
        self.in_flight += 1
        return Run(api, message.id)

    def finish(self, request_id: str | None, result: ApiResponse | RequestLevelError) -> bytes:
        """The message to send for a finished request (RFC 8887 §4.3.2 Response or §4.3.4 RequestError)."""
        self.in_flight -= 1
        if isinstance(result, RequestLevelError):
            return encoder.encode(result.to_request_error(request_id))
        return encoder.encode(Response(methodResponses=result.methodResponses, sessionState=result.sessionState,
                                       createdIds=result.createdIds, requestId=request_id))
