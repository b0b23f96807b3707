"""permessage-deflate (RFC 7692): parsing of `Sec-WebSocket-Extensions` offers, negotiation, and the errors of
the compress/inflate framing.

No I/O and no zlib here: the framing itself lives in `gateway._deflate` (compiled) and its twin
`gateway._deflate_py`; both raise the `TooBig` and `Corrupt` defined here and validate with the helpers here.
`Compression` holds the process's shared compressor and inflater built from one of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.errors import Close, ProtocolViolation

EXTENSION_NAME = "permessage-deflate"

# zlib's deflate cannot compress raw DEFLATE with a 256-byte window: deflateInit2() rejects windowBits -8
# (zlib >= 1.2.9 silently turns 8 into 9 for zlib-wrapped streams only, see the zlib.h notes on windowBits).
# Compressing with 9 instead would emit distances up to 512 that a peer holding us to 8 cannot resolve, so the
# smallest window we can honestly promise is 9. Inflating with an 8-bit window works.
MIN_COMPRESS_WINDOW_BITS = 9
MIN_INFLATE_WINDOW_BITS = 8
MAX_WINDOW_BITS = 15

# RFC 7692 §7.1.2.1 / §7.1.2.2: a decimal integer from 8 to 15 without leading zeroes. Spelled out instead of
# `\d` (which matches non-ASCII digits) so that only those eight exact strings pass.
_WINDOW_BITS = re.compile(r"[89]|1[0-5]")


class TooBig(ProtocolViolation):
    """The inflated message would exceed the size limit (close 1009, RFC 6455 §7.4.1)."""

    def __init__(self, reason: str = "message too big after decompression") -> None:
        super().__init__(Close.MESSAGE_TOO_BIG, reason)


class Corrupt(ProtocolViolation):
    """The compressed payload is not valid DEFLATE data: RFC 7692 §6.2 has the connection failed. The code is
    1007 (RFC 6455 §7.4.1: data inconsistent with the message's type), the project's protocol decision."""

    def __init__(self, reason: str = "invalid compressed data") -> None:
        super().__init__(Close.INVALID_TEXT, reason)


@dataclass(frozen=True, slots=True)
class DeflateParams:
    """What a handshake agreed. `server_no_context_takeover` and `client_no_context_takeover` are not fields:
    every accepted offer has both, so the gateway keeps no per-connection zlib state (DESIGN.md §3)."""

    server_max_window_bits: int  # the window our shared Compressor uses for this peer (9..15)
    client_max_window_bits: int  # the largest window the peer compresses with (8..15); Inflater(15) takes any


class ExtensionOffer(NamedTuple):
    """One element of a `Sec-WebSocket-Extensions` list: lowercased name and parameters in order; a value is
    unquoted, None for a parameter without one."""

    name: str
    params: tuple[tuple[str, str | None], ...]


def negotiate(header_values: Iterable[str], *, enabled: bool = True,
              max_window_bits: int = MAX_WINDOW_BITS) -> tuple[DeflateParams, str] | None:
    """The first acceptable permessage-deflate offer of the request's `Sec-WebSocket-Extensions` headers, as
    agreed parameters and the response header value; None when there is none (the upgrade goes on without
    compression).

    `max_window_bits` caps the window we compress with; below 15 it is announced even to peers that did not
    ask (RFC 7692 §7.1.2.1 lets the server include `server_max_window_bits` unasked).
    """
    if not MIN_COMPRESS_WINDOW_BITS <= max_window_bits <= MAX_WINDOW_BITS:
        raise ValueError(f"max_window_bits must be {MIN_COMPRESS_WINDOW_BITS}..{MAX_WINDOW_BITS}")
    if not enabled:
        return None
    for offer in parse_extensions(header_values):
        if offer.name != EXTENSION_NAME:
            continue
        accepted = _accept(offer.params, max_window_bits)
        if accepted is not None:
            return accepted
    return None


def _accept(params: tuple[tuple[str, str | None], ...],
            max_window_bits: int) -> tuple[DeflateParams, str] | None:
    """The answer to one offer, or None to decline it (the next offer is then considered)."""
    offered: dict[str, str | None] = {}
    for name, value in params:
        # RFC 7692 §7.1: decline an offer with a parameter twice, an unknown parameter or an invalid value.
        if name in offered:
            return None
        offered[name] = value
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            # RFC 7692 §7.1.1.1, §7.1.1.2: these parameters have no value.
            if value is not None:
                return None
        elif name == "server_max_window_bits":
            # RFC 7692 §7.1.2.1: a value is required.
            if value is None or not _WINDOW_BITS.fullmatch(value):
                return None
        elif name == "client_max_window_bits":
            # RFC 7692 §7.1.2.2: the value is optional (without one the client only says it supports it).
            if value is not None and not _WINDOW_BITS.fullmatch(value):
                return None
        else:
            return None

    # RFC 7692 §7.1.1.1 and §7.1.1.2: the server may add both no-context-takeover parameters unasked. With
    # them one compressed payload serves every recipient and one process-wide inflater serves every peer.
    response = [EXTENSION_NAME, "server_no_context_takeover", "client_no_context_takeover"]

    server_bits = max_window_bits
    asked = offered.get("server_max_window_bits")
    if asked is not None:
        # RFC 7692 §7.1.2.1: answer with the same or a smaller value. A peer that holds us to 8 is declined
        # because zlib cannot compress raw DEFLATE within 256 bytes (see MIN_COMPRESS_WINDOW_BITS); the server
        # may decline a configuration it does not support (§7.1).
        server_bits = min(int(asked), max_window_bits)
        if server_bits < MIN_COMPRESS_WINDOW_BITS:
            return None
    if asked is not None or server_bits < MAX_WINDOW_BITS:
        response.append(f"server_max_window_bits={server_bits}")

    client_bits = MAX_WINDOW_BITS
    hint = offered.get("client_max_window_bits")
    if hint is not None:
        # RFC 7692 §7.1.2.2: the client announced the window it will use; echoing it binds it. Without a
        # value (or without the parameter) the client may use 15, which our inflater accepts anyway; the
        # response must not carry the parameter when the offer did not (§7.1.2.2), so it is only echoed.
        client_bits = int(hint)
        response.append(f"client_max_window_bits={client_bits}")

    agreed = DeflateParams(server_max_window_bits=server_bits, client_max_window_bits=client_bits)
    return agreed, "; ".join(response)


def validate_compressor(level: int, wbits: int) -> None:
    """Argument checks shared by both Compressor implementations, so they reject the same inputs alike."""
    # Level 0 is excluded on purpose: stored blocks only make the payload bigger, and zlib cuts them by the
    # size of the output buffer, which would break byte-identical output between the two implementations.
    if not 1 <= level <= 9:
        raise ValueError(f"compression level must be 1..9, not {level}")
    if not MIN_COMPRESS_WINDOW_BITS <= wbits <= MAX_WINDOW_BITS:
        raise ValueError(f"compressor window bits must be {MIN_COMPRESS_WINDOW_BITS}..{MAX_WINDOW_BITS}, "
                         f"not {wbits}")


def validate_inflater(wbits: int) -> None:
    if not MIN_INFLATE_WINDOW_BITS <= wbits <= MAX_WINDOW_BITS:
        raise ValueError(f"inflater window bits must be {MIN_INFLATE_WINDOW_BITS}..{MAX_WINDOW_BITS}, "
                         f"not {wbits}")


def validate_max_size(max_size: int) -> None:
    if max_size < 0:
        raise ValueError(f"max_size must not be negative, not {max_size}")


# RFC 7230 §3.2.6 tchar: the characters of a token.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _Malformed(Exception):
    pass


def parse_extensions(header_values: Iterable[str]) -> list[ExtensionOffer]:
    """Every well-formed element of the given `Sec-WebSocket-Extensions` header values, in order.

    Grammar of RFC 6455 §9.1 (`extension *( ";" extension-param )`, a param being `token [ "=" (token |
    quoted-string) ]`) with the list rules of RFC 7230 §7 (OWS around separators, empty elements ignored).
    A malformed element is dropped: it could not be accepted anyway, and the elements after it still count.
    """
    if isinstance(header_values, str):  # one header value would be read as one header per character
        raise TypeError("header_values must be an iterable of header values, not a str")
    offers: list[ExtensionOffer] = []
    for value in header_values:
        i, n = 0, len(value)
        while i < n:
            i = _ows(value, i)
            if i < n and value[i] == ",":  # RFC 7230 §7: empty list elements are ignored
                i += 1
                continue
            if i >= n:
                break
            start = i
            try:
                offer, i = _element(value, i)
            except _Malformed:
                i = _skip_element(value, start)
                continue
            offers.append(offer)
    return offers


def _element(s: str, i: int) -> tuple[ExtensionOffer, int]:
    """One extension at `s[i]`; returns it and the index just after its terminating comma (or the end)."""
    n = len(s)
    name, i = _token(s, i)
    params: list[tuple[str, str | None]] = []
    while True:
        i = _ows(s, i)
        if i >= n:
            return ExtensionOffer(name.lower(), tuple(params)), i
        if s[i] == ",":
            return ExtensionOffer(name.lower(), tuple(params)), i + 1
        if s[i] != ";":
            raise _Malformed
        i = _ows(s, i + 1)
        param, i = _token(s, i)
        j = _ows(s, i)
        value: str | None = None
        if j < n and s[j] == "=":
            i = _ows(s, j + 1)
            if i < n and s[i] == '"':
                value, i = _quoted(s, i)
                # RFC 6455 §9.1: after unescaping, a quoted value must still be a token.
                if not value or not _TCHAR.issuperset(value):
                    raise _Malformed
            else:
                value, i = _token(s, i)
        params.append((param.lower(), value))


def _token(s: str, i: int) -> tuple[str, int]:
    j = i
    while j < len(s) and s[j] in _TCHAR:
        j += 1
    if j == i:
        raise _Malformed
    return s[i:j], j


def _quoted(s: str, i: int) -> tuple[str, int]:
    """RFC 7230 §3.2.6 quoted-string at `s[i] == '"'`: its unescaped content and the index after it."""
    out: list[str] = []
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == '"':
            return "".join(out), j + 1
        if c == "\\":
            j += 1
            if j >= len(s):
                break
            c = s[j]
        if not _qdtext(c):
            raise _Malformed
        out.append(c)
        j += 1
    raise _Malformed  # unterminated


def _qdtext(c: str) -> bool:
    # HTAB, SP, VCHAR and obs-text (RFC 7230 §3.2.6); the quote and the backslash are handled by the caller.
    o = ord(c)
    return c in "\t " or 0x21 <= o <= 0x7E or 0x80 <= o <= 0xFF


def _ows(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t":
        i += 1
    return i


def _skip_element(s: str, i: int) -> int:
    """Index just after the comma that ends the element starting at `s[i]` (commas inside quotes do not)."""
    quoted = False
    while i < len(s):
        c = s[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ",":
            return i + 1
        i += 1
    return i


class Compression:
    """The process's one compressor and one inflater (RFC 7692 with no context takeover both ways), shared by the
    hub's fan-out and every connection's replies: a push is compressed once for all its recipients (DESIGN.md §3).

    `impl` is gateway._deflate or its twin; messages under `min_bytes` go out plain (allowed per message, §6)."""

    __slots__ = ("_compressor", "_inflater", "_max_size", "min_bytes")

    def __init__(self, impl: Any, *, level: int, min_bytes: int, max_size: int) -> None:
        self._compressor = impl.Compressor(level, MAX_WINDOW_BITS)
        self._inflater = impl.Inflater(MAX_WINDOW_BITS)
        self._max_size = max_size
        self.min_bytes = min_bytes

    def compress(self, payload: memoryview | bytes) -> bytes | None:
        """The compressed bytes of one outgoing message, or None to send it plain (a small one)."""
        if len(payload) < self.min_bytes:
            return None
        return bytes(self._compressor.compress(payload))

    def inflate(self, payload: bytes) -> bytes:
        """Inflate one message whose first frame had rsv1 (§7.2.2), within the message size limit; raises TooBig
        or Corrupt (ProtocolViolation) otherwise."""
        data: bytes = self._inflater.inflate(payload, self._max_size)
        return data
