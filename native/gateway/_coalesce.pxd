# cython: language_level=3
"""C-level contract of gateway._coalesce (native/gateway/_coalesce.pyx): the Coalescer's typed fields and its C
methods, so that another native module can cimport it by its dotted name (DESIGN.md §2)."""

cimport cython


# json_too_deep over a C buffer: whether JSON text nests deeper than `limit` (gateway._ingest's lines).
cdef bint too_deep(const unsigned char* p, Py_ssize_t n, Py_ssize_t limit) noexcept nogil


# UTF-8 decoding state between fragments (RFC 3629 §4): `need` continuation bytes still to come, the first of
# them in [lo, hi].
cdef struct Utf8State:
    int need
    unsigned char lo
    unsigned char hi


@cython.no_gc
@cython.final
cdef class Coalescer:
    cdef readonly int opcode
    cdef readonly bint rsv1
    cdef readonly int error_code
    cdef readonly str error_reason
    cdef Py_ssize_t _max_size
    cdef bint _allow_rsv1
    cdef bint _in_message
    cdef int _cur_opcode
    cdef bint _cur_rsv1
    cdef bint _check_utf8
    cdef Utf8State _utf8
    cdef char* _buf
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef bytes _ready

    cdef void _release(self) noexcept
    cdef int _fail(self, int code, str reason)
    cdef int _append(self, const char* p, Py_ssize_t n) except -1
    cdef int _data(self, int opcode, bint fin, int rsv, const char* p, Py_ssize_t n, bytes whole) except -1
