"""Decoding of client messages and encoding of server messages on the socket (RFC 8887 §4.3). No I/O here.

Every input, however malformed, yields either a typed message or a `RequestLevelError` (notJSON / notRequest)
that the caller turns into a RequestError; no other exception escapes `decode_client`.

Nesting depth: JSON nested deeper than `max_depth` (GATEWAY_MAX_JSON_DEPTH) is refused before it is parsed, as
notJSON: RFC 8259 §9 lets a parser limit nesting, and text this parser does not take "did not parse" (RFC 8620
§3.6.1). Not `limit`, whose `limit` property must name a capability of the session, and not `notRequest`,
which says the text parsed. Everything that walks client JSON afterwards (result references, filters, patches,
the encoder) may then recurse over it without coming near the interpreter's recursion limit.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway import native
from gateway.errors import NOT_JSON, NOT_REQUEST, RequestLevelError
from gateway.jmap.types import ApiRequest, ClientMessage

DEFAULT_MAX_DEPTH = 64  # GATEWAY_MAX_JSON_DEPTH's default
# The compiled scan when it is built (as for the coalescer, which the same module holds), else its twin.
_checks = native.load("_coalesce")

_client_decoder: msgspec.json.Decoder[ClientMessage] = msgspec.json.Decoder(ClientMessage)
_api_decoder = msgspec.json.Decoder(ApiRequest)
_any_decoder = msgspec.json.Decoder()
encoder = msgspec.json.Encoder()


def check_depth(data: bytes, max_depth: int) -> None:
    """Raise notJSON when `data` nests deeper than `max_depth` (see the module docstring)."""
    if _checks.json_too_deep(data, max_depth):
        raise RequestLevelError(
            NOT_JSON, f"The JSON nests deeper than {max_depth} levels, the limit of this server.")


def _readable_id(data: bytes) -> str | None:
    """The `id` of a message that is JSON but not a valid message, so the RequestError can echo it."""
    try:
        obj: Any = _any_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str):
            return rid
    return None


def decode_client(data: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> ClientMessage:
    """Decode one text message from the client; raise RequestLevelError notJSON/notRequest otherwise."""
    check_depth(data, max_depth)
    try:
        return _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        # RFC 8887 §4.3.4 / DESIGN.md §4: JSON that is not a valid message (including an unknown @type or a
        # client sending "Response") is notRequest, with the id echoed when it can be read.
        raise _not_request(str(exc), _readable_id(data)) from None
    except (msgspec.DecodeError, RecursionError):
        # RecursionError: only with a GATEWAY_MAX_JSON_DEPTH near the interpreter's own limit.
        raise RequestLevelError(NOT_JSON, "The message is not valid JSON.") from None


def decode_api_request(data: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> ApiRequest:
    """Decode an RFC 8620 §3.3 Request POSTed to the apiUrl."""
    check_depth(data, max_depth)
    try:
        return _api_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _not_request(str(exc), None) from None
    except (msgspec.DecodeError, RecursionError):
        raise RequestLevelError(NOT_JSON, "The request body is not valid JSON.") from None


def _not_request(reason: str, request_id: str | None) -> RequestLevelError:
    return RequestLevelError(NOT_REQUEST, f"The message is not a valid JMAP WebSocket message: {reason}.",
                             request_id=request_id)
