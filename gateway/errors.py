"""The gateway's one error hierarchy and the one place that maps errors to wire answers.

Code raises what went wrong (`RequestLevelError`, `Unauthorized`, `Unavailable`, ...); only the two functions at
the end of this module decide what the peer sees: `problem_of` for HTTP (an RFC 7807 problem with its status and
headers) and `request_error_of` for the socket (an RFC 8887 §4.3.4 `RequestError`). Method-level errors become
`["error", {...}, callId]` invocations (RFC 8620 §3.6.2); protocol violations on the socket carry their close
code (RFC 6455 §7.4.1). No I/O here.
"""

from __future__ import annotations

import errno
from http import HTTPStatus
from typing import Any

import msgspec

from gateway.jmap.types import Invocation, ProblemDetails, RequestError

JMAP_ERROR = "urn:ietf:params:jmap:error:"
NOT_JSON = JMAP_ERROR + "notJSON"
NOT_REQUEST = JMAP_ERROR + "notRequest"
LIMIT = JMAP_ERROR + "limit"
UNKNOWN_CAPABILITY = JMAP_ERROR + "unknownCapability"
SERVER_FAIL = JMAP_ERROR + "serverFail"
SERVER_UNAVAILABLE = JMAP_ERROR + "serverUnavailable"  # not in RFC 8620's list; used by James and others
PROBLEM_CONTENT_TYPE = "application/problem+json"
RETRY_AFTER = "5"  # seconds a client is asked to wait when something the gateway needs is away


# RFC 6455 §7.4.1 close codes used by the gateway.
class Close:
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_TEXT = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class RequestLevelError(GatewayError):
    """RFC 8620 §3.6.1: the whole request is refused (problem details with a JMAP error type). `request_id` is the
    RFC 8887 request id the error answers, when it could be read."""

    def __init__(self, type_uri: str, detail: str, status: int = 400, limit: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(detail)
        self.type_uri = type_uri
        self.detail = detail
        self.status = status
        self.limit = limit
        self.request_id = request_id


class MethodError(GatewayError):
    """RFC 8620 §3.6.2: one method call fails; the others of the request go on."""

    def __init__(self, type_name: str, description: str | None = None, **extra: Any) -> None:
        super().__init__(description or type_name)
        self.type_name = type_name
        self.description = description
        self.extra = extra

    def to_invocation(self, call_id: str) -> Invocation:
        args: dict[str, Any] = {"type": self.type_name}
        if self.description is not None:
            args["description"] = self.description
        args.update(self.extra)
        return ("error", args, call_id)


class ProtocolViolation(GatewayError):
    """The peer broke the WebSocket protocol: the connection is closed with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class HTTPProblem(GatewayError):
    """An HTTP error answer with an RFC 7807 body (400, 404, 409, 429, ...), and the form every other error takes
    on its way to an HTTP peer (`problem_of`)."""

    def __init__(self, status: int, detail: str, *, type_uri: str = "about:blank",
                 headers: dict[str, str] | None = None, limit: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type_uri = type_uri
        self.headers = headers or {}
        self.limit = limit

    def body(self) -> bytes:
        return msgspec.json.encode(ProblemDetails(type=self.type_uri, status=self.status, title=title(self.status),
                                                  detail=self.detail, limit=self.limit))


class ListenError(GatewayError):
    """A listener cannot bind its address. The message is the operator's one line: what is wrong and which
    setting moves it, e.g. `127.0.0.1:2525 (SMTP) is already in use; set GATEWAY_SMTP_PORT to a free port`."""

    def __init__(self, what: str, host: str, port: int, host_setting: str, port_setting: str, port_hint: str,
                 error: OSError) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if error.errno == errno.EADDRINUSE:
            text = f"{where} ({what}) is already in use; set {port_setting} to a free port ({port_hint})"
        else:
            text = (f"cannot listen on {where} ({what}): {error.strerror or error}; "
                    f"check {host_setting} and {port_setting}")
        super().__init__(text)
        self.port_setting = port_setting
        self.error = error


class Unauthorized(GatewayError):
    """The credentials are missing or not valid (401); `challenge` is the WWW-Authenticate to answer with."""

    def __init__(self, detail: str, challenge: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.challenge = challenge


class Forbidden(GatewayError):
    """The credentials are valid but may not do this (403)."""


class Unavailable(GatewayError):
    """Something the gateway needs (the upstream server, the broker) cannot answer now: 503, try again later."""


def title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# --- the one mapper ------------------------------------------------------------------------------------------

def problem_of(exc: BaseException) -> HTTPProblem:
    """What an HTTP peer is answered for `exc` (anything not raised on purpose is a 500)."""
    if isinstance(exc, HTTPProblem):
        return exc
    if isinstance(exc, RequestLevelError):
        return HTTPProblem(exc.status, exc.detail, type_uri=exc.type_uri, limit=exc.limit)
    if isinstance(exc, Unauthorized):
        return HTTPProblem(401, exc.detail, headers={"WWW-Authenticate": exc.challenge} if exc.challenge else None)
    if isinstance(exc, Forbidden):
        return HTTPProblem(403, str(exc))
    if isinstance(exc, Unavailable):
        # Never a 401 for an outage: clients retry instead of asking their user for a password.
        return HTTPProblem(503, str(exc), headers={"Retry-After": RETRY_AFTER})
    return HTTPProblem(500, "Internal server error.")


def request_error_of(exc: BaseException, request_id: str | None) -> RequestError:
    """What a socket peer is answered for a request that ended with `exc` (RFC 8887 §4.3.4)."""
    if isinstance(exc, RequestLevelError):
        return RequestError(type=exc.type_uri, status=exc.status, detail=exc.detail, requestId=request_id,
                            limit=exc.limit)
    if isinstance(exc, Unavailable):
        return RequestError(type=SERVER_UNAVAILABLE, status=503, detail=str(exc), requestId=request_id)
    if isinstance(exc, Unauthorized | Forbidden | HTTPProblem):
        problem = problem_of(exc)
        return RequestError(type=problem.type_uri, status=problem.status, detail=problem.detail,
                            requestId=request_id)
    return RequestError(type=SERVER_FAIL, status=500, detail="The server failed to process the request.",
                        requestId=request_id)


def problem_response(exc: BaseException) -> bytes:
    """A complete HTTP/1.1 error response for `exc`, for the few places that write to a raw transport (refused
    upgrades); the connection is closed after it."""
    problem = problem_of(exc)
    body = problem.body()
    lines = [f"HTTP/1.1 {problem.status} {title(problem.status)}", f"Content-Type: {PROBLEM_CONTENT_TYPE}",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in problem.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
