# cython: language_level=3
"""C-level contract of gateway._broadcast (native/gateway/_broadcast.pyx): the typed fields of Target, so that
the broadcast loop reads them without Python attribute lookups and other native modules (gateway._bench) can
cimport them by their dotted name (DESIGN.md §2)."""

from picows.picows cimport WSTransport


cdef class Target:
    # Set through the `transport` property only, which keeps _ws in step.
    cdef object _transport
    # The same object as _transport when it is a picows WSTransport (else None): the write then goes through
    # picows' C vtable, with no attribute lookup, bound-method object or argument tuple per recipient.
    cdef WSTransport _ws
    # Owned by the hub and the transport adapter; public so that Python code reads and writes them.
    cdef public bint deflate  # the connection negotiated permessage-deflate (RFC 7692)
    cdef public bint paused  # its socket's write buffer is over the high-water mark: merge, do not write
    cdef public object pending  # the StateChange merged while paused: {accountId: {type: state}} or None
