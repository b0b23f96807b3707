"""WebSocket message coalescer in pure Python: the twin of the compiled gateway._coalesce, same behaviour.

It reassembles fragmented frames into messages, enforces the framing rules of RFC 6455 §5 and RFC 7692 §6.1
and the size limit, and validates UTF-8 of text messages as it goes, and checks the nesting depth of JSON
before it is parsed. It is not a frame parser; no I/O here.
"""

from __future__ import annotations

import codecs
import re
from typing import Final

# RFC 6455 §5.2 opcodes.
CONTINUATION: Final = 0
TEXT: Final = 1
BINARY: Final = 2
CLOSE: Final = 8
PING: Final = 9
PONG: Final = 10

# feed() results.
PENDING: Final = 0
MESSAGE: Final = 1
CONTROL: Final = 2
ERROR: Final = 3

# RFC 6455 §7.4.1 close codes.
_PROTOCOL_ERROR: Final = 1002
_INVALID_TEXT: Final = 1007
_MESSAGE_TOO_BIG: Final = 1009

_RSV1: Final = 4  # (rsv1 << 2) | (rsv2 << 1) | rsv3
_MAX_CONTROL_PAYLOAD: Final = 125

# The reasons are part of the observable behaviour: the compiled module uses the very same strings.
_R_RSV23: Final = "reserved bits rsv2/rsv3 set"
_R_OPCODE: Final = "reserved opcode"
_R_CONTROL_RSV1: Final = "rsv1 set on a control frame"
_R_CONTROL_FRAGMENTED: Final = "fragmented control frame"
_R_CONTROL_LONG: Final = "control frame payload longer than 125 bytes"
_R_CONTINUATION_RSV1: Final = "rsv1 set on a continuation frame"
_R_NOTHING_TO_CONTINUE: Final = "continuation frame without a message to continue"
_R_INTERLEAVED: Final = "new data frame before the fragmented message ended"
_R_RSV1_NOT_NEGOTIATED: Final = "rsv1 set but no extension negotiated"
_R_TOO_BIG: Final = "message too big"
_R_INVALID_UTF8: Final = "invalid UTF-8 in a text message"

# CPython's UTF-8 decoder is strict per RFC 3629 (no overlongs, surrogates or code points above U+10FFFF) and,
# fed incrementally, raises at the first byte that makes the text certainly invalid while it keeps an
# incomplete tail for the next call: the fail-fast behaviour of the compiled state machine, with one exception
# handled in Coalescer._data (a pending ED A0..BF).
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")

_Payload = bytes | bytearray | memoryview


def utf8_valid(data: _Payload) -> bool:
    """Whether the whole buffer is valid UTF-8 (RFC 3629); used on inflated permessage-deflate messages."""
    try:
        str(data, "utf-8")
    except UnicodeDecodeError:
        return False
    return True


# The bytes json_too_deep() looks at; everything else is skipped at the regex engine's speed.
_STRUCTURE = re.compile(rb'["\\\[\]{}]')


def json_too_deep(data: _Payload, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit` (RFC 8259 §9 lets a parser limit depth).

    A scan, not a validator: brackets inside strings do not count (a backslash in a string escapes the next
    byte), closers without an opener are ignored, and anything else is left to the JSON decoder."""
    raw = data if isinstance(data, bytes) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot nest deeper than it has openers: the common case, without a scan
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _STRUCTURE.finditer(raw):
        i = match.start()
        if i == escaped_at:
            continue
        c = raw[i]
        if in_string:
            if c == 0x5C:
                escaped_at = i + 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x5B or c == 0x7B:
            depth += 1
            if depth > limit:
                return True
        elif (c == 0x5D or c == 0x7D) and depth:
            depth -= 1
    return False


class Coalescer:
    """Feed it every frame of one connection in order; it says when a message is complete (see feed())."""

    __slots__ = (
        "_allow_rsv1", "_buf", "_check_utf8", "_cur_opcode", "_cur_rsv1", "_decoder", "_error_code",
        "_error_reason", "_in_message", "_max_size", "_opcode", "_ready", "_rsv1",
    )

    def __init__(self, max_size: int, allow_rsv1: bool = False) -> None:
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self._max_size = max_size
        self._allow_rsv1 = bool(allow_rsv1)
        self._opcode = 0
        self._rsv1 = False
        self._error_code = 0
        self._error_reason = ""
        self._in_message = False
        self._cur_opcode = 0
        self._cur_rsv1 = False
        self._check_utf8 = False
        self._decoder: codecs.IncrementalDecoder | None = None
        self._buf: bytearray | None = None
        self._ready: bytes | None = None

    @property
    def opcode(self) -> int:
        return self._opcode

    @property
    def rsv1(self) -> bool:
        return self._rsv1

    @property
    def error_code(self) -> int:
        return self._error_code

    @property
    def error_reason(self) -> str:
        return self._error_reason

    @property
    def buffered(self) -> int:
        return 0 if self._buf is None else len(self._buf)

    def take(self) -> bytes:
        """The completed message's payload; releases it, so the next message starts clean."""
        ready = self._ready
        if ready is None:
            raise RuntimeError("no message ready")
        self._ready = None
        return ready

    def _release(self) -> None:
        # Buffers are dropped after every fragmented message: an idle connection holds no message memory.
        self._buf = None
        self._decoder = None
        self._in_message = False

    def _fail(self, code: int, reason: str) -> int:
        self._error_code = code
        self._error_reason = reason
        self._release()
        self._ready = None
        return ERROR

    def feed(self, opcode: int, fin: bool, rsv: int, payload: _Payload) -> int:
        """Take one frame; returns PENDING, MESSAGE, CONTROL or ERROR (module constants)."""
        if self._error_code:
            return ERROR
        # RFC 6455 §5.2: a reserved bit may only be set by a negotiated extension; only permessage-deflate
        # (RFC 7692) exists here, and it defines rsv1 alone.
        if rsv & ~_RSV1:
            return self._fail(_PROTOCOL_ERROR, _R_RSV23)
        if opcode >= CLOSE:
            if opcode > PONG:
                return self._fail(_PROTOCOL_ERROR, _R_OPCODE)  # RFC 6455 §5.2: 0xB-0xF are reserved
            # RFC 7692 §6.1: rsv1 is meaningless on control frames.
            if rsv:
                return self._fail(_PROTOCOL_ERROR, _R_CONTROL_RSV1)
            # RFC 6455 §5.5: control frames are never fragmented and carry at most 125 bytes.
            if not fin:
                return self._fail(_PROTOCOL_ERROR, _R_CONTROL_FRAGMENTED)
            if len(payload) > _MAX_CONTROL_PAYLOAD:
                return self._fail(_PROTOCOL_ERROR, _R_CONTROL_LONG)
            # RFC 6455 §5.4: control frames may come between the fragments of a message; it stays as it is.
            return CONTROL
        if opcode > BINARY or opcode < 0:
            return self._fail(_PROTOCOL_ERROR, _R_OPCODE)  # RFC 6455 §5.2: 0x3-0x7 are reserved
        if opcode == CONTINUATION:
            # RFC 7692 §6.1: rsv1 marks a compressed message on its first frame only.
            if rsv:
                return self._fail(_PROTOCOL_ERROR, _R_CONTINUATION_RSV1)
            # RFC 6455 §5.4: a continuation needs a message to continue.
            if not self._in_message:
                return self._fail(_PROTOCOL_ERROR, _R_NOTHING_TO_CONTINUE)
        else:
            # RFC 6455 §5.4: the fragments of one message are not interleaved with another message's.
            if self._in_message:
                return self._fail(_PROTOCOL_ERROR, _R_INTERLEAVED)
            if rsv and not self._allow_rsv1:
                return self._fail(_PROTOCOL_ERROR, _R_RSV1_NOT_NEGOTIATED)
        return self._data(opcode, bool(fin), rsv, payload)

    def _data(self, opcode: int, fin: bool, rsv: int, payload: _Payload) -> int:
        """A data frame that passed the framing checks."""
        buf = self._buf
        # Checked before anything is stored, so the buffer never grows past the limit.
        if len(payload) > self._max_size - (0 if buf is None else len(buf)):
            return self._fail(_MESSAGE_TOO_BIG, _R_TOO_BIG)
        if opcode != CONTINUATION:
            self._cur_opcode = opcode
            self._cur_rsv1 = rsv != 0
            # A compressed (rsv1) message is validated after inflation, with utf8_valid().
            self._check_utf8 = opcode == TEXT and not self._cur_rsv1
        if fin and not self._in_message:
            # An unfragmented message (the usual case): at most one copy, none if it already is bytes.
            if self._check_utf8 and not utf8_valid(payload):
                return self._fail(_INVALID_TEXT, _R_INVALID_UTF8)
            self._ready = payload if type(payload) is bytes else bytes(payload)
            self._opcode = self._cur_opcode
            self._rsv1 = self._cur_rsv1
            return MESSAGE
        # RFC 6455 §8.1: a text message must be valid UTF-8, checked across fragment boundaries.
        if self._check_utf8:
            decoder = self._decoder
            if decoder is None:
                decoder = self._decoder = _Utf8Decoder()
            try:
                decoder.decode(payload, fin)
            except UnicodeDecodeError:
                return self._fail(_INVALID_TEXT, _R_INVALID_UTF8)
            if not fin:
                # CPython keeps ED A0..BF as a possibly incomplete tail (surrogate handlers need it), though
                # no valid text continues it (RFC 3629 §3: no surrogates): fail here, in this frame.
                tail = decoder.getstate()[0]
                if len(tail) > 1 and tail[0] == 0xED and tail[1] > 0x9F:
                    return self._fail(_INVALID_TEXT, _R_INVALID_UTF8)
        if buf is None:
            buf = self._buf = bytearray(payload)
        else:
            buf += payload
        if not fin:
            self._in_message = True
            return PENDING
        self._ready = bytes(buf)
        self._release()
        self._opcode = self._cur_opcode
        self._rsv1 = self._cur_rsv1
        return MESSAGE
