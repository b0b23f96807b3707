# cython: language_level=3
"""C-level contract of gateway._ingest (native/gateway/_ingest.pyx): the typed fields of the ingest stream's
Reader and of the memory bus's Dispatch (DESIGN.md §2)."""


cdef class Reader:
    cdef public object parser    # httptools.HttpRequestParser calling on_body/on_message_complete, or None
    cdef public list body        # the body pieces of the current read
    cdef public bint complete    # llhttp saw the end of the body
    cdef public bint open        # reads are taken (the owner closes it for good when the stream ends)
    cdef public Py_ssize_t accepted  # events published so far
    cdef object _owner           # gateway.transport.ingest.IngestProtocol: every other read's lines
    cdef object _lines           # gateway.bus.events.EventLines: its pending bytes, failure and line count
    cdef object _publish         # the bus's publish_now, or None
    cdef object _decode          # msgspec's decode_lines into StateChangeEvent | list[StateChangeEvent]
    cdef Py_ssize_t _limit       # the longest line (GATEWAY_MAX_SIZE_REQUEST)
    cdef Py_ssize_t _depth       # the deepest JSON nesting a line may have

    cdef bint _usual(self) except -1
    cdef list _lines_of(self, bytes piece, Py_ssize_t* count)


cdef class Dispatch:
    cdef set _subscribed         # the memory bus's subscribed usernames (its own set, never a copy)
    cdef public object handler   # the bus handler (the hub's Lane), or None while the bus is stopped
    cdef public unsigned long long published  # events offered
