# cython: language_level=3
"""WebSocket message coalescer, compiled: reassembles fragmented frames into messages, enforces the framing
rules of RFC 6455 §5 and RFC 7692 §6.1, the size limit, and validates UTF-8 of text messages as it goes. It also
has the one content check that must run before a message is parsed: the nesting depth of its JSON.

It is not a frame parser (picows parses frames) and does no I/O. Its pure-Python twin with identical behaviour
is gateway._coalesce_py; tests/unit/test_coalesce.py runs the same tests on both.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

# RFC 6455 §5.2 opcodes.
cdef enum:
    _CONTINUATION = 0
    _TEXT = 1
    _BINARY = 2
    _CLOSE = 8
    _PING = 9
    _PONG = 10

# feed() results.
cdef enum:
    _PENDING = 0
    _MESSAGE = 1
    _CONTROL = 2
    _ERROR = 3

# RFC 6455 §7.4.1 close codes.
cdef enum:
    _PROTOCOL_ERROR = 1002
    _INVALID_TEXT = 1007
    _MESSAGE_TOO_BIG = 1009

cdef enum:
    _RSV1 = 4            # (rsv1 << 2) | (rsv2 << 1) | rsv3
    _MAX_CONTROL_PAYLOAD = 125
    _FIRST_CAPACITY = 1024

CONTINUATION = _CONTINUATION
TEXT = _TEXT
BINARY = _BINARY
CLOSE = _CLOSE
PING = _PING
PONG = _PONG

PENDING = _PENDING
MESSAGE = _MESSAGE
CONTROL = _CONTROL
ERROR = _ERROR

# The reasons are part of the observable behaviour: the twin uses the very same strings.
_R_RSV23 = "reserved bits rsv2/rsv3 set"
_R_OPCODE = "reserved opcode"
_R_CONTROL_RSV1 = "rsv1 set on a control frame"
_R_CONTROL_FRAGMENTED = "fragmented control frame"
_R_CONTROL_LONG = "control frame payload longer than 125 bytes"
_R_CONTINUATION_RSV1 = "rsv1 set on a continuation frame"
_R_NOTHING_TO_CONTINUE = "continuation frame without a message to continue"
_R_INTERLEAVED = "new data frame before the fragmented message ended"
_R_RSV1_NOT_NEGOTIATED = "rsv1 set but no extension negotiated"
_R_TOO_BIG = "message too big"
_R_INVALID_UTF8 = "invalid UTF-8 in a text message"

# UTF-8 per RFC 3629 §4, written as a state machine over its ABNF (Utf8State, in the .pxd): after a lead byte,
# `need` continuation bytes must follow and the first of them must lie in [lo, hi]. The narrowed first ranges
# are what reject overlongs (E0 80..9F, F0 80..8F), surrogates (ED A0..BF) and code points above U+10FFFF
# (F4 90..BF); C0, C1 and F5..FF can never start a sequence. Every later continuation byte is 80..BF.


cdef inline void _utf8_reset(Utf8State* st) noexcept nogil:
    st.need = 0
    st.lo = 0x80
    st.hi = 0xBF


cdef Py_ssize_t _utf8_open(Utf8State* st, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Continue a code point that is open in `st`, a byte at a time: the bytes consumed (stopping when it
    completes or the input ends), or -1 at the first byte that cannot continue it."""
    cdef Py_ssize_t i = 0
    cdef unsigned char b
    while st.need and i < n:
        b = p[i]
        if b < st.lo or b > st.hi:
            return -1
        st.need -= 1
        st.lo = 0x80
        st.hi = 0xBF
        i += 1
    return i


cdef bint _utf8_scan(Utf8State* st, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Advance `st` over p[0:n]. False at the first byte that no valid UTF-8 text can contain there, so an
    error is reported in the frame where it becomes certain (fail fast, as Autobahn's cases 6.x expect)."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t k
    cdef int need
    cdef unsigned char b, lo, hi
    cdef uint64_t word = 0  # filled by memcpy; initialised to keep Cython's flow analysis quiet
    if st.need:
        # A code point split across fragments.
        i = _utf8_open(st, p, n)
        if i < 0:
            return False
    while i < n:
        b = p[i]
        if b < 0x80:
            i += 1
            # JMAP JSON is mostly ASCII: skip it a machine word at a time (memcpy is an unaligned load).
            while i + 8 <= n:
                memcpy(&word, p + i, 8)
                if word & 0x8080808080808080ULL:  # any byte >= 0x80
                    break
                i += 8
            continue
        lo = 0x80
        hi = 0xBF
        if b < 0xC2:
            return False  # a stray continuation byte, or C0/C1 (always overlong)
        elif b < 0xE0:
            need = 1
        elif b < 0xF0:
            need = 2
            if b == 0xE0:
                lo = 0xA0
            elif b == 0xED:
                hi = 0x9F
        elif b < 0xF5:
            need = 3
            if b == 0xF0:
                lo = 0x90
            elif b == 0xF4:
                hi = 0x8F
        else:
            return False  # F5..FF would start a code point above U+10FFFF
        if i + need < n:
            # The whole sequence is in this buffer (the usual case): check it in place.
            b = p[i + 1]
            if b < lo or b > hi:
                return False
            if need > 1 and (p[i + 2] & 0xC0) != 0x80:
                return False
            if need > 2 and (p[i + 3] & 0xC0) != 0x80:
                return False
            i += need + 1
        else:
            # The sequence runs past the end of this fragment: check what is here, keep the rest open.
            st.need = need
            st.lo = lo
            st.hi = hi
            k = _utf8_open(st, p + i + 1, n - i - 1)
            return k >= 0
    return True


def utf8_valid(data):
    """Whether the whole buffer is valid UTF-8 (RFC 3629); used on inflated permessage-deflate messages."""
    cdef Py_buffer view
    cdef Utf8State st
    cdef bint ok
    _utf8_reset(&st)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        ok = _utf8_scan(&st, <const unsigned char*>view.buf, view.len) and st.need == 0
    finally:
        PyBuffer_Release(&view)
    return ok


def json_too_deep(data, Py_ssize_t limit):
    """Whether JSON text nests arrays/objects deeper than `limit` (RFC 8259 §9 lets a parser limit depth).

    A scan, not a validator: brackets inside strings do not count (a backslash in a string escapes the next
    byte), closers without an opener are ignored, and anything else is left to the JSON decoder. It stops at
    the first bracket past the limit, so hostile input costs at most one pass over the bytes."""
    cdef Py_buffer view
    cdef bint result
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            result = too_deep(<const unsigned char*>view.buf, view.len, limit)
    finally:
        PyBuffer_Release(&view)
    return result


cdef bint too_deep(const unsigned char* p, Py_ssize_t n, Py_ssize_t limit) noexcept nogil:
    """json_too_deep over a C buffer (declared in _coalesce.pxd: gateway._ingest checks its lines with it)."""
    cdef Py_ssize_t i = 0, depth = 0
    cdef bint in_string = False
    cdef unsigned char c
    while i < n:
        c = p[i]
        if in_string:
            if c == 0x5C:  # backslash: the next byte is escaped
                i += 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x5B or c == 0x7B:
            depth += 1
            if depth > limit:
                return True
        elif (c == 0x5D or c == 0x7D) and depth > 0:
            depth -= 1
        i += 1
    return False


@cython.no_gc
@cython.final
cdef class Coalescer:
    """Feed it every frame of one connection in order; it says when a message is complete (see feed())."""

    # Fields and C methods are declared in _coalesce.pxd.

    def __cinit__(self):
        self._buf = NULL
        self._len = 0
        self._cap = 0
        self.error_reason = ""
        self._ready = None
        _utf8_reset(&self._utf8)

    def __init__(self, Py_ssize_t max_size, bint allow_rsv1=False):
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self._max_size = max_size
        self._allow_rsv1 = allow_rsv1

    def __dealloc__(self):
        free(self._buf)

    @property
    def buffered(self):
        return self._len

    def take(self):
        """The completed message's payload; releases it, so the next message starts clean."""
        cdef bytes ready = self._ready
        if ready is None:
            raise RuntimeError("no message ready")
        self._ready = None
        return ready

    cdef void _release(self) noexcept:
        # Buffers are dropped after every fragmented message: fragmentation is rare, and an idle connection
        # should hold no message memory (DESIGN.md §3, small idle connections).
        free(self._buf)
        self._buf = NULL
        self._len = 0
        self._cap = 0
        self._in_message = False

    cdef int _fail(self, int code, str reason):
        self.error_code = code
        self.error_reason = reason
        self._release()
        self._ready = None
        return _ERROR

    cdef int _append(self, const char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t needed = self._len + n
        cdef Py_ssize_t cap
        cdef char* grown
        if needed > self._cap:
            cap = self._cap * 2 if self._cap else _FIRST_CAPACITY
            if cap < needed:
                cap = needed
            if cap > self._max_size:
                cap = self._max_size  # needed <= max_size was checked before: never hold more than the limit
            grown = <char*>realloc(self._buf, cap)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._cap = cap
        if n:
            memcpy(self._buf + self._len, p, n)
            self._len = needed
        return 0

    def feed(self, int opcode, bint fin, int rsv, payload):
        """Take one frame (opcode 0..15, rsv the 3-bit field, payload a contiguous bytes-like object);
        returns PENDING, MESSAGE, CONTROL or ERROR (module constants)."""
        cdef Py_buffer view
        cdef int result
        if self.error_code:
            return _ERROR
        # RFC 6455 §5.2: a reserved bit may only be set by a negotiated extension; only permessage-deflate
        # (RFC 7692) exists here, and it defines rsv1 alone.
        if rsv & ~_RSV1:
            return self._fail(_PROTOCOL_ERROR, _R_RSV23)
        if opcode >= _CLOSE:
            if opcode > _PONG:
                return self._fail(_PROTOCOL_ERROR, _R_OPCODE)  # RFC 6455 §5.2: 0xB-0xF are reserved
            # RFC 7692 §6.1: rsv1 is meaningless on control frames.
            if rsv:
                return self._fail(_PROTOCOL_ERROR, _R_CONTROL_RSV1)
            # RFC 6455 §5.5: control frames are never fragmented and carry at most 125 bytes. picows checks
            # this too; the check here keeps the coalescer correct on its own.
            if not fin:
                return self._fail(_PROTOCOL_ERROR, _R_CONTROL_FRAGMENTED)
            if len(payload) > _MAX_CONTROL_PAYLOAD:
                return self._fail(_PROTOCOL_ERROR, _R_CONTROL_LONG)
            # RFC 6455 §5.4: control frames may come between the fragments of a message; it stays as it is.
            return _CONTROL
        if opcode > _BINARY or opcode < 0:
            return self._fail(_PROTOCOL_ERROR, _R_OPCODE)  # RFC 6455 §5.2: 0x3-0x7 are reserved
        if opcode == _CONTINUATION:
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
        if type(payload) is bytes:
            return self._data(opcode, fin, rsv, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload), payload)
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            result = self._data(opcode, fin, rsv, <const char*>view.buf, view.len, None)
        finally:
            PyBuffer_Release(&view)
        return result

    cdef int _data(self, int opcode, bint fin, int rsv, const char* p, Py_ssize_t n, bytes whole) except -1:
        """A data frame that passed the framing checks; `whole` is the payload when it already is bytes."""
        # Checked before anything is stored, so the buffer never grows past the limit.
        if n > self._max_size - self._len:
            return self._fail(_MESSAGE_TOO_BIG, _R_TOO_BIG)
        if opcode != _CONTINUATION:
            self._cur_opcode = opcode
            self._cur_rsv1 = rsv != 0
            # A compressed (rsv1) message is validated after inflation, with utf8_valid().
            self._check_utf8 = opcode == _TEXT and not self._cur_rsv1
            _utf8_reset(&self._utf8)
        # RFC 6455 §8.1: a text message must be valid UTF-8, checked across fragment boundaries.
        if self._check_utf8:
            if not _utf8_scan(&self._utf8, <const unsigned char*>p, n):
                return self._fail(_INVALID_TEXT, _R_INVALID_UTF8)
            if fin and self._utf8.need:
                return self._fail(_INVALID_TEXT, _R_INVALID_UTF8)
        if fin and not self._in_message:
            # An unfragmented message (the usual case): at most one copy, none if picows gave us bytes.
            self._ready = whole if whole is not None else PyBytes_FromStringAndSize(p, n)
            self.opcode = self._cur_opcode
            self.rsv1 = self._cur_rsv1
            return _MESSAGE
        self._append(p, n)
        if not fin:
            self._in_message = True
            return _PENDING
        self._ready = PyBytes_FromStringAndSize(self._buf, self._len) if self._len else b""
        self._release()
        self.opcode = self._cur_opcode
        self.rsv1 = self._cur_rsv1
        return _MESSAGE
