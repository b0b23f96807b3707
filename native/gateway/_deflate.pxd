# cython: language_level=3
"""C-level contract of gateway._deflate (native/gateway/_deflate.pyx): zlib's stream type and the typed fields
and C methods of Compressor and Inflater, so that another native module can cimport them (DESIGN.md §2)."""


cdef extern from "zlib.h":
    ctypedef unsigned char Bytef
    ctypedef unsigned int uInt
    ctypedef unsigned long uLong
    # Only the fields we touch; zlib.h has the full struct, and zalloc/zfree/opaque stay zeroed (Z_NULL)
    # so that zlib uses its default allocator.
    ctypedef struct z_stream:
        Bytef *next_in
        uInt avail_in
        Bytef *next_out
        uInt avail_out
        char *msg


cdef class Compressor:
    cdef z_stream _strm
    cdef bint _ready
    cdef unsigned char *_buf  # output buffer, reused across messages up to _KEEP bytes
    cdef size_t _cap

    cdef int _reserve(self, size_t size) except -1


cdef class Inflater:
    cdef z_stream _strm
    cdef bint _ready
    cdef unsigned char *_buf
    cdef size_t _cap
    # State of the message being inflated, shared with _feed.
    cdef size_t _written
    cdef size_t _first
    cdef size_t _unused
    cdef int _rc

    cdef int _feed(self, const unsigned char *src, size_t left, size_t limit) except -1
