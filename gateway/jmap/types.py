"""msgspec Structs for the JMAP wire objects of RFC 8620 (Core) and RFC 8887 (WebSocket binding).

Field names are the RFCs' own (camelCase) so that the Structs read like the specifications. No I/O here.
"""

from __future__ import annotations

from typing import Any

import msgspec

CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
WEBSOCKET = "urn:ietf:params:jmap:websocket"

# RFC 8620 §3.2: an Invocation is [name, arguments, methodCallId].
Invocation = tuple[str, dict[str, Any], str]


class ApiRequest(msgspec.Struct, omit_defaults=True):
    """RFC 8620 §3.3 Request object, as POSTed to the apiUrl and handed to a request path."""

    using: list[str]
    methodCalls: list[Invocation]
    createdIds: dict[str, str] | None = None


class ApiResponse(msgspec.Struct, omit_defaults=True):
    """RFC 8620 §3.4 Response object, as returned by a request path and by the apiUrl.

    `methodResponses` may be raw JSON when a request path only relays it (front mode): encoded as it came."""

    methodResponses: list[Invocation] | msgspec.Raw
    sessionState: str
    createdIds: dict[str, str] | None = None


# --- RFC 8887 §4.3: messages on the socket, tagged on "@type" ----------------------------------------------

class Request(msgspec.Struct, tag_field="@type", tag="Request", omit_defaults=True, forbid_unknown_fields=False):
    """RFC 8887 §4.3.1: a JMAP Request with an optional client-chosen `id`."""

    using: list[str]
    methodCalls: list[Invocation]
    createdIds: dict[str, str] | None = None
    id: str | None = None

    def to_api(self) -> ApiRequest:
        return ApiRequest(using=self.using, methodCalls=self.methodCalls, createdIds=self.createdIds)


class WebSocketPushEnable(msgspec.Struct, tag_field="@type", tag="WebSocketPushEnable", omit_defaults=True):
    """RFC 8887 §4.3.5.2: start pushing StateChange objects, optionally resuming from `pushState`."""

    dataTypes: list[str] | None = None
    pushState: str | None = None


class WebSocketPushDisable(msgspec.Struct, tag_field="@type", tag="WebSocketPushDisable"):
    """RFC 8887 §4.3.5.3: stop pushing."""


ClientMessage = Request | WebSocketPushEnable | WebSocketPushDisable


class Response(msgspec.Struct, tag_field="@type", tag="Response", omit_defaults=True):
    """RFC 8887 §4.3.2: a Response, with `requestId` when the Request carried an `id`."""

    methodResponses: list[Invocation] | msgspec.Raw
    sessionState: str
    createdIds: dict[str, str] | None = None
    requestId: str | None = None


class RequestError(msgspec.Struct, tag_field="@type", tag="RequestError", omit_defaults=True):
    """RFC 8887 §4.3.4: a request-level error, an RFC 7807 problem with `@type` and `requestId`.

    `requestId` is always present (null when the id could not be read), per the protocol decisions.
    """

    type: str
    status: int
    detail: str
    requestId: str | None  # no default, so it is encoded even when null
    limit: str | None = None
    title: str | None = None


class StateChange(msgspec.Struct, tag_field="@type", tag="StateChange"):
    """RFC 8620 §7.1 / RFC 8887 §4.3.5.1: accountId -> type name -> state string, and the resume cursor."""

    changed: dict[str, dict[str, str]]
    pushState: str | None = None


class ProblemDetails(msgspec.Struct, omit_defaults=True):
    """RFC 7807 problem details, the body of every HTTP error answer."""

    type: str
    status: int
    title: str
    detail: str | None = None
    limit: str | None = None
