"""The gateway's one error hierarchy and the one place that maps errors to wire answers.

Request-level errors become RFC 8887 `RequestError` objects on the socket or RFC 7807 problem bodies over HTTP;
method-level errors become `["error", {...}, callId]` invocations (RFC 8620 §3.6.2); protocol violations on
the socket become close codes (RFC 6455 §7.4.1).
"""

from __future__ import annotations

import errno
from typing import Any

import msgspec

from gateway.jmap.types import Invocation, ProblemDetails, RequestError

JMAP_ERROR = "urn:ietf:params:jmap:error:"
NOT_JSON = JMAP_ERROR + "notJSON"
NOT_REQUEST = JMAP_ERROR + "notRequest"
LIMIT = JMAP_ERROR + "limit"
UNKNOWN_CAPABILITY = JMAP_ERROR + "unknownCapability"
SERVER_UNAVAILABLE = JMAP_ERROR + "serverUnavailable"  # not in RFC 8620's list; used by James and others


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
    """RFC 8620 §3.6.1: the whole request is refused (problem details with a JMAP error type)."""

    def __init__(self, type_uri: str, detail: str, status: int = 400, limit: str | None = None) -> None:
        super().__init__(detail)
        self.type_uri = type_uri
        self.detail = detail
        self.status = status
        self.limit = limit

    def to_request_error(self, request_id: str | None) -> RequestError:
        return RequestError(type=self.type_uri, status=self.status, detail=self.detail,
                            requestId=request_id, limit=self.limit)

    def to_problem(self) -> ProblemDetails:
        return ProblemDetails(type=self.type_uri, status=self.status, title=_title(self.status),
                              detail=self.detail, limit=self.limit)


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
    """An HTTP error answer with an RFC 7807 body (401, 403, 404, 429, 503, ...)."""

    def __init__(self, status: int, detail: str, *, type_uri: str = "about:blank",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type_uri = type_uri
        self.headers = headers or {}

    def body(self) -> bytes:
        return msgspec.json.encode(
            ProblemDetails(type=self.type_uri, status=self.status, title=_title(self.status), detail=self.detail))


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


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


PROBLEM_CONTENT_TYPE = "application/problem+json"
