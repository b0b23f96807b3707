"""Admission of JMAP requests, the same for the WebSocket and for `POST /jmap/api` (RFC 8620 §3.6.1 request-level
checks, `maxCallsInRequest`, and `maxConcurrentRequests` per connection or per HTTP user). No I/O here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

from gateway.errors import LIMIT, UNKNOWN_CAPABILITY, HTTPProblem, RequestLevelError
from gateway.jmap.types import ApiRequest


def check_request(request: ApiRequest, supported: Collection[str], max_calls: int) -> None:
    """RFC 8620 §3.6.1: every capability in `using` is supported, and no more calls than `max_calls`.

    Raises RequestLevelError (unknownCapability, or limit/maxCallsInRequest)."""
    for capability in request.using:
        if capability not in supported:
            raise RequestLevelError(UNKNOWN_CAPABILITY,
                                    f"The request uses the capability {capability!r}, which this server "
                                    "does not support.")
    if len(request.methodCalls) > max_calls:
        raise RequestLevelError(LIMIT, f"The request has {len(request.methodCalls)} method calls; "
                                f"maxCallsInRequest is {max_calls}.", limit="maxCallsInRequest")


def too_many_in_flight(limit: int, where: str) -> RequestLevelError:
    return RequestLevelError(LIMIT, f"At most {limit} requests may be in flight {where}.",
                             limit="maxConcurrentRequests")


class UserLimiter:
    """`maxConcurrentRequests` for HTTP API calls: requests in flight per user on this process (a socket counts
    its own, in the connection core)."""

    __slots__ = ("_in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    @contextmanager
    def hold(self, username: str) -> Iterator[None]:
        """Count one request of `username` while the block runs; RequestLevelError(limit) when over the limit."""
        n = self._in_flight.get(username, 0)
        if n >= self.limit:
            raise too_many_in_flight(self.limit, "for one user")
        self._in_flight[username] = n + 1
        try:
            yield
        finally:
            left = self._in_flight[username] - 1
            if left:
                self._in_flight[username] = left
            else:
                del self._in_flight[username]

    def in_flight(self, username: str) -> int:
        return self._in_flight.get(username, 0)


class UserCounts:
    """Connections (WebSockets and event streams) per user on this process, for GATEWAY_MAX_CONNECTIONS_PER_USER."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def admit(self, username: str, limit: int) -> None:
        """HTTPProblem(429) when `username` already holds `limit` connections."""
        count = self._open.get(username, 0)
        if count >= limit:
            raise HTTPProblem(429, f"{username} already has {count} connections on this server.",
                              headers={"Retry-After": "10"})

    def opened(self, username: str) -> None:
        self._open[username] = self._open.get(username, 0) + 1

    def closed(self, username: str) -> None:
        n = self._open.get(username, 1) - 1
        if n <= 0:
            self._open.pop(username, None)
        else:
            self._open[username] = n

    def of(self, username: str) -> int:
        return self._open.get(username, 0)
