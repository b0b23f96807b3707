"""Decoding of client messages and encoding of server messages on the socket (RFC 8887 §4.3). No I/O here.

Every input, however malformed, yields either a typed message or a `RequestLevelError` (notJSON / notRequest)
that the caller turns into a RequestError; no other exception escapes `decode_client`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import NOT_JSON, NOT_REQUEST, RequestLevelError
from gateway.jmap.types import ApiRequest, ClientMessage

_client_decoder: msgspec.json.Decoder[ClientMessage] = msgspec.json.Decoder(ClientMessage)
_api_decoder = msgspec.json.Decoder(ApiRequest)
_any_decoder = msgspec.json.Decoder()
encoder = msgspec.json.Encoder()


def _readable_id(data: bytes) -> str | None:
    """The `id` of a message that is JSON but not a valid message, so the RequestError can echo it."""
    try:
        obj: Any = _any_decoder.decode(data)
    except msgspec.DecodeError:
        return None
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str):
            return rid
    return None


def decode_client(data: bytes) -> ClientMessage:
    """Decode one text message from the client; raise RequestLevelError notJSON/notRequest otherwise."""
    try:
        return _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        # RFC 8887 §4.3.4 / DESIGN.md §4: JSON that is not a valid message (including an unknown @type or a
        # client sending "Response") is notRequest, with the id echoed when it can be read.
        raise _not_request(str(exc), _readable_id(data)) from None
    except msgspec.DecodeError:
        raise RequestLevelError(NOT_JSON, "The message is not valid JSON.") from None


def decode_api_request(data: bytes) -> ApiRequest:
    """Decode an RFC 8620 §3.3 Request POSTed to the apiUrl."""
    try:
        return _api_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _not_request(str(exc), None) from None
    except msgspec.DecodeError:
        raise RequestLevelError(NOT_JSON, "The request body is not valid JSON.") from None


def _not_request(reason: str, request_id: str | None) -> RequestLevelError:
    return RequestLevelError(NOT_REQUEST, f"The message is not a valid JMAP WebSocket message: {reason}.",
                             request_id=request_id)
