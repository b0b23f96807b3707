# cython: language_level=3
"""Benchmark and test helpers of the compiled hot path; not a production module (no twin, not required by
GATEWAY_REQUIRE_NATIVE, never imported by the gateway).

`floor_send` is the syscall floor the broadcast loop is compared with (bench/test_bench_broadcast.py, the fan-out
harness's floor peer); `is_fast_path` tells tests whether gateway._broadcast writes a target through picows' C
vtable, read from Target's C field through the contract in _broadcast.pxd.
"""

cimport cython

from gateway._broadcast cimport Target


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)


def is_fast_path(Target target):
    """Whether broadcast writes to this target go through picows' C vtable (its transport is a WSTransport)."""
    return target._ws is not None


@cython.boundscheck(False)
def floor_send(const int[::1] fds not None, const unsigned char[::1] frame not None):
    """send(2) `frame` to every fd and nothing else: the syscall floor a broadcast is compared with. Returns how
    many sends wrote the whole frame."""
    cdef Py_ssize_t i
    cdef Py_ssize_t n = fds.shape[0]
    cdef Py_ssize_t size = frame.shape[0]
    cdef Py_ssize_t complete = 0
    cdef const unsigned char* data = &frame[0] if size else NULL
    with nogil:
        for i in range(n):
            # Flags 0, as picows' own fast path uses, so both pay for the same kernel work.
            if send(fds[i], data, <size_t>size, 0) == size:
                complete += 1
    return complete
