# cython: language_level=3
"""Compiled RFC 7692 §7.2 compress/inflate framing on zlib's C API: one z_stream per object, reset after every
message (deflateReset/inflateReset) instead of a new stream per message, and a reused output buffer.

Same API, bytes and exceptions as the pure-Python twin `gateway._deflate_py`; no negotiation here
(`gateway.deflate`). Not thread-safe: the GIL is held throughout and each object belongs to one event loop.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.string cimport memcmp, memset

from gateway.deflate import Corrupt, TooBig, validate_compressor, validate_inflater, validate_max_size

__all__ = ["ZLIB_VERSION", "Compressor", "Corrupt", "Inflater", "TooBig"]


# zlib's types (z_stream, Bytef, uInt, uLong) are declared in _deflate.pxd, which the classes' fields need.
cdef extern from "zlib.h":
    const char *zlibVersion()
    # deflateInit2/inflateInit2 are macros in zlib.h (they pass the version and struct size); Cython only
    # emits the call, so declaring them as functions is enough.
    int deflateInit2(z_stream *strm, int level, int method, int windowBits, int memLevel, int strategy)
    int deflate(z_stream *strm, int flush)
    int deflateReset(z_stream *strm)
    int deflateEnd(z_stream *strm)
    uLong deflateBound(z_stream *strm, uLong sourceLen)
    int inflateInit2(z_stream *strm, int windowBits)
    int inflate(z_stream *strm, int flush)
    int inflateReset(z_stream *strm)
    int inflateEnd(z_stream *strm)

    enum:
        Z_OK
        Z_STREAM_END
        Z_BUF_ERROR
        Z_MEM_ERROR
        Z_NO_FLUSH
        Z_SYNC_FLUSH
        Z_DEFLATED
        Z_DEFAULT_STRATEGY


ZLIB_VERSION = zlibVersion().decode("ascii")

cdef enum:
    # zlib's default memLevel; the twin passes the same so that both produce the same bytes.
    _MEM_LEVEL = 8
    # avail_in/avail_out are 32-bit: larger buffers are handed to zlib in steps of this size.
    _STEP = 1 << 30
    # Output buffers up to this size are kept for the next message; bigger ones are freed after use so that
    # one large message does not pin its memory for the life of the process.
    _KEEP = 64 * 1024
    # First output buffer of an inflate beyond 4x the input: compressed JSON inflates some 3-10 times; the
    # buffer then doubles.
    _FIRST_INFLATE = 4096

# RFC 7692 §7.2.1 / §7.2.2: the empty stored block ending a sync flush; stripped on send, appended on receive.
cdef const unsigned char *_TAIL = b"\x00\x00\xff\xff"

# Outcomes of Inflater._feed.
cdef enum:
    _CONSUMED = 0
    _FULL = 1
    _ENDED = 2
    _FAILED = 3


cdef inline size_t _min(size_t a, size_t b) noexcept nogil:
    return a if a < b else b


cdef class Compressor:
    """Compresses whole messages, each one independently (no context takeover): equal input, equal bytes."""

    # Fields and C methods are declared in _deflate.pxd.

    def __cinit__(self):
        memset(&self._strm, 0, sizeof(z_stream))
        self._ready = False
        self._buf = NULL
        self._cap = 0

    def __init__(self, int level, int wbits):
        validate_compressor(level, wbits)
        if self._ready:
            deflateEnd(&self._strm)
            self._ready = False
        # Negative windowBits: raw DEFLATE, no zlib header or checksum (RFC 7692 §7.2.1).
        rc = deflateInit2(&self._strm, level, Z_DEFLATED, -wbits, _MEM_LEVEL, Z_DEFAULT_STRATEGY)
        if rc == Z_MEM_ERROR:
            raise MemoryError()
        if rc != Z_OK:
            raise RuntimeError(f"deflateInit2 failed ({rc})")
        self._ready = True

    def __dealloc__(self):
        if self._ready:
            deflateEnd(&self._strm)
        PyMem_Free(self._buf)

    cdef int _reserve(self, size_t size) except -1:
        cdef unsigned char *grown
        if size <= self._cap:
            return 0
        grown = <unsigned char *>PyMem_Realloc(self._buf, size)
        if grown == NULL:
            raise MemoryError()
        self._buf = grown
        self._cap = size
        return 0

    def compress(self, data):
        cdef Py_buffer view
        cdef const unsigned char *src
        cdef size_t left, take, avail
        cdef size_t written = 0
        cdef int rc, flush
        if not self._ready:
            raise RuntimeError("Compressor.__init__ was not called")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            src = <const unsigned char *>view.buf
            left = <size_t>view.len
            # deflateBound() covers a Z_FINISH stream; the sync flush's empty stored block and byte alignment
            # add a few bytes more, and the loop below grows the buffer should that ever not suffice.
            self._reserve(<size_t>deflateBound(&self._strm, <uLong>left) + 16)
            while True:
                take = _min(left, _STEP)
                left -= take
                # RFC 7692 §7.2.1: compress the whole message, then flush with an empty stored block.
                flush = Z_SYNC_FLUSH if left == 0 else Z_NO_FLUSH
                self._strm.next_in = <Bytef *>src
                self._strm.avail_in = <uInt>take
                src += take
                while True:
                    if written == self._cap:
                        self._reserve(self._cap * 2)
                    avail = _min(self._cap - written, _STEP)
                    self._strm.next_out = self._buf + written
                    self._strm.avail_out = <uInt>avail
                    rc = deflate(&self._strm, flush)
                    written += avail - self._strm.avail_out
                    if rc != Z_OK and rc != Z_BUF_ERROR:
                        raise RuntimeError(f"deflate failed ({rc})")
                    # Room left over means zlib took all the input and finished the flush.
                    if self._strm.avail_out != 0:
                        break
                if flush == Z_SYNC_FLUSH:
                    break
            # RFC 7692 §7.2.1: remove the 00 00 ff ff of the trailing empty stored block. An empty message
            # thereby becomes the single octet 0x00 (§7.2.3.6).
            if written < 4 or memcmp(self._buf + written - 4, _TAIL, 4) != 0:
                raise RuntimeError("zlib sync flush did not end with an empty stored block")
            return PyBytes_FromStringAndSize(<char *>self._buf, <Py_ssize_t>(written - 4))
        finally:
            PyBuffer_Release(&view)
            # RFC 7692 §7.1.1.1 (server_no_context_takeover): the next message starts from an empty window,
            # which also makes the output for a given input always the same.
            deflateReset(&self._strm)
            if self._cap > _KEEP:
                PyMem_Free(self._buf)
                self._buf = NULL
                self._cap = 0


cdef class Inflater:
    """Inflates whole messages, each from an empty window (client_no_context_takeover), within a limit."""

    # Fields and C methods are declared in _deflate.pxd.

    def __cinit__(self):
        memset(&self._strm, 0, sizeof(z_stream))
        self._ready = False
        self._buf = NULL
        self._cap = 0

    def __init__(self, int wbits=15):
        validate_inflater(wbits)
        if self._ready:
            inflateEnd(&self._strm)
            self._ready = False
        rc = inflateInit2(&self._strm, -wbits)  # raw DEFLATE
        if rc == Z_MEM_ERROR:
            raise MemoryError()
        if rc != Z_OK:
            raise RuntimeError(f"inflateInit2 failed ({rc})")
        self._ready = True

    def __dealloc__(self):
        if self._ready:
            inflateEnd(&self._strm)
        PyMem_Free(self._buf)

    cdef int _feed(self, const unsigned char *src, size_t left, size_t limit) except -1:
        """Inflates src[:left] into the buffer after the `_written` bytes already there, never holding more
        than `limit` bytes of output. Returns _CONSUMED, _FULL (limit reached with work possibly left),
        _ENDED (final block done, `_unused` bytes of this input unread) or _FAILED (zlib error in `_rc`)."""
        cdef size_t take, avail, room, size
        cdef unsigned char *grown
        cdef int rc
        while True:
            take = _min(left, _STEP)
            left -= take
            self._strm.next_in = <Bytef *>src
            self._strm.avail_in = <uInt>take
            src += take
            while True:
                room = _min(self._cap, limit)
                if self._written == room:
                    if room == limit:
                        return _FULL
                    # Bounded growth: the buffer never exceeds the limit, so a bomb costs at most limit bytes.
                    size = _min(self._cap * 2 if self._cap else self._first, limit)
                    grown = <unsigned char *>PyMem_Realloc(self._buf, size)
                    if grown == NULL:
                        raise MemoryError()
                    self._buf = grown
                    self._cap = size
                    room = size
                avail = _min(room - self._written, _STEP)
                self._strm.next_out = self._buf + self._written
                self._strm.avail_out = <uInt>avail
                rc = inflate(&self._strm, Z_SYNC_FLUSH)
                self._written += avail - self._strm.avail_out
                if rc == Z_STREAM_END:
                    self._unused = self._strm.avail_in + left
                    return _ENDED
                if rc != Z_OK and rc != Z_BUF_ERROR:
                    self._rc = rc
                    return _FAILED
                # Room left over means zlib took all of this input.
                if self._strm.avail_out != 0:
                    break
            if left == 0:
                return _CONSUMED

    def inflate(self, data, Py_ssize_t max_size):
        cdef Py_buffer view
        cdef const unsigned char *src
        cdef int status
        cdef bint in_tail = False
        cdef bint after_final_ok
        cdef size_t limit
        if not self._ready:
            raise RuntimeError("Inflater.__init__ was not called")
        if max_size < 0:
            validate_max_size(max_size)
        # One byte past the limit tells "exactly max_size" from "more than max_size".
        limit = <size_t>max_size + 1
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            src = <const unsigned char *>view.buf
            self._written = 0
            self._first = _min(<size_t>view.len, (<size_t>-1) // 8) * 4 + _FIRST_INFLATE
            # RFC 7692 §7.2.2: inflate the payload followed by 00 00 ff ff (fed separately: no copy).
            status = self._feed(src, <size_t>view.len, limit)
            if status == _CONSUMED:
                in_tail = True
                status = self._feed(_TAIL, 4, limit)
            if status == _FAILED:
                if self._rc == Z_MEM_ERROR:
                    raise MemoryError()
                reason = self._strm.msg.decode("utf-8", "replace") if self._strm.msg != NULL else str(self._rc)
                raise Corrupt(f"invalid compressed data: {reason}")
            if self._written > <size_t>max_size:
                raise TooBig(f"message inflates to more than {max_size} bytes")
            if status == _ENDED:
                # RFC 7692 §7.2.3.4: a message may end with a BFINAL block; after it we accept only our own
                # tail, optionally preceded by the 0x00 that opens the empty stored block it completes.
                if in_tail:
                    after_final_ok = self._unused == 4
                else:
                    after_final_ok = self._unused == 0 or (self._unused == 1 and src[view.len - 1] == 0)
                if not after_final_ok:
                    raise Corrupt("invalid compressed data: data after the final block")
            return PyBytes_FromStringAndSize(<char *>self._buf, <Py_ssize_t>self._written)
        finally:
            PyBuffer_Release(&view)
            # RFC 7692 §7.1.1.2 (client_no_context_takeover): the next message starts from an empty window.
            inflateReset(&self._strm)
            if self._cap > _KEEP:
                PyMem_Free(self._buf)
                self._buf = NULL
                self._cap = 0
