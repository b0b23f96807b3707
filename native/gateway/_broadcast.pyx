# cython: language_level=3
"""Compiled broadcast loop: writes one pre-encoded StateChange frame to every target of a fan-out group, and
merges the change into the pending StateChange of targets whose socket is paused.

It does not encode, compress or own sockets; the hub does that. Its pure-Python twin with identical behaviour is
gateway._broadcast_py; tests/unit/test_broadcast.py runs the same tests on both.
"""

from cpython.dict cimport PyDict_Next
from cpython.object cimport PyObject
from picows.picows cimport WSMsgType, WSTransport


cdef extern from "Python.h":
    Py_ssize_t PyDict_GET_SIZE(object d)
    ctypedef struct PyTypeObject
    PyTypeObject* Py_TYPE(PyObject* o)


cdef extern from *:
    # GCC/Clang builtin: a hint that never faults, so it is safe on any address.
    void __builtin_prefetch(const void* addr) nogil


# This module calls WSTransport's methods through the vtable layout of the picows.pxd it was compiled against;
# Cython checks the object size at import but not that layout. A picows of another minor version may order its
# methods differently, so refuse to load (native.load then reports the module missing) rather than call the
# wrong slot. Move this constant with the picows pin (pyproject.toml, Dockerfile) only after reading the new
# picows.pxd, then rebuild.
_PICOWS_SERIES = "2.3"
from picows import __version__ as _picows_version
if not (_picows_version + ".").startswith(_PICOWS_SERIES + "."):
    raise ImportError(f"gateway._broadcast was written against picows {_PICOWS_SERIES}.x, found {_picows_version}:"
                      " check picows.pxd, update _PICOWS_SERIES and rebuild")


cdef enum:
    _TEXT = 1
    _HEADROOM = 14

TEXT = _TEXT
HEADROOM = _HEADROOM  # room before the payload for the largest server frame header (RFC 6455 §5.2)


cdef class Target:
    """The push end of one connection: its picows transport and its pause/merge state."""

    # Fields are declared in _broadcast.pxd. `deflate` and `paused` are C ints (bint): whatever is assigned
    # reads back as a bool, and the twin coerces the same way.

    def __init__(self, transport, bint deflate=False):
        self.transport = transport
        self.deflate = deflate
        self.paused = False
        self.pending = None

    @property
    def transport(self):
        return self._transport

    @transport.setter
    def transport(self, value):
        # Decided once per transport, not per write: anything that is not a picows transport (a test double,
        # another adapter) is written through its Python method, exactly as the twin does.
        self._transport = value
        self._ws = value if isinstance(value, WSTransport) else None


cdef int _merge_target(Target target, object account_id, object type_states) except -1:
    # Exactly a Target: its pending field is read and written in the struct, no attribute lookup.
    cdef object pending = target.pending
    cdef object current
    if pending is None:
        target.pending = {account_id: dict(type_states)}
        return 0
    current = pending.get(account_id)
    if current is None:
        pending[account_id] = dict(type_states)
    else:
        current.update(type_states)
    return 0


cdef int _merge(object target, object account_id, object type_states) except -1:
    # Attribute access stays generic (not the Target struct) so that duck-typed targets and subclasses (which
    # may override the attribute) behave as in the twin.
    pending = target.pending
    if pending is None:
        target.pending = {account_id: dict(type_states)}
        return 0
    current = pending.get(account_id)
    if current is None:
        pending[account_id] = dict(type_states)
    else:
        current.update(type_states)
    return 0


def merge(target, account_id, type_states):
    """Fold a change into the target's pending StateChange (newest state wins)."""
    if type(target) is Target:
        _merge_target(<Target>target, account_id, type_states)
    else:
        _merge(target, account_id, type_states)


cdef inline int _write_target(Target target, bytearray plain, bytearray compressed,
                              bint have_compressed) except -1:
    cdef WSTransport ws = target._ws
    if have_compressed and target.deflate:
        # RFC 7692 §6: rsv1 marks the compressed message; the payload is shared by every recipient.
        if ws is not None:
            ws.send_reuse_external_bytearray(WSMsgType.TEXT, compressed, _HEADROOM, True, True)
        else:
            target._transport.send_reuse_external_bytearray(TEXT, compressed, HEADROOM, True, True)
    elif ws is not None:
        ws.send_reuse_external_bytearray(WSMsgType.TEXT, plain, _HEADROOM)
    else:
        target._transport.send_reuse_external_bytearray(TEXT, plain, HEADROOM)
    return 0


cdef int _write_other(object target, bytearray plain, bytearray compressed, bint have_compressed) except -1:
    # Anything that is not exactly a Target (a subclass, a duck-typed object): the twin's statements verbatim.
    if have_compressed and target.deflate:
        target.transport.send_reuse_external_bytearray(TEXT, compressed, HEADROOM, True, True)
    else:
        target.transport.send_reuse_external_bytearray(TEXT, plain, HEADROOM)
    return 0


def broadcast(targets, plain, compressed, account_id, type_states):
    """Send the frame to every target; merge it into paused ones. Returns how many were written."""
    # Checked by hand, with the twin's messages, so that both refuse exactly the same arguments.
    if type(targets) is not dict:
        raise TypeError("targets must be a dict")
    if type(plain) is not bytearray or (compressed is not None and type(compressed) is not bytearray):
        raise TypeError("plain and compressed must be bytearrays")
    return _broadcast(<dict>targets, <bytearray>plain, <bytearray>compressed, account_id, type_states)


cdef inline void _prefetch(const void* p, int lines) noexcept nogil:
    cdef const char* c = <const char*>p
    cdef int i
    for i in range(lines):
        __builtin_prefetch(c + 64 * i)


cdef inline void _prefetch_ahead(dict targets, Py_ssize_t pos) noexcept:
    """Start loading what the next sends will touch while the kernel works on this one.

    Per recipient a write reads a Target, its WSTransport and that transport's asyncio transport, scattered
    over the heap; with thousands of recipients they miss the caches, which the syscall floor does not pay.
    A three-stage pipeline: the Target three ahead, the WSTransport two ahead (its pointer is read from a Target
    loaded one round ago), and one ahead what picows' send reads behind the WSTransport. Every pointer is read
    from the dict now, never kept across a send, so a send that changes the group cannot leave one dangling.
    """
    cdef PyObject* k1
    cdef PyObject* k2
    cdef PyObject* k3
    cdef PyObject* ws
    cdef Py_ssize_t p = pos
    if not PyDict_Next(targets, &p, &k1, NULL):
        return
    if Py_TYPE(k1) == <PyTypeObject*>Target:
        ws = <PyObject*>(<Target>k1)._ws
        if ws != <PyObject*>None:
            _prefetch(<PyObject*>(<WSTransport>ws)._tr_get_write_buffer_size, 2)
            _prefetch(<PyObject*>(<WSTransport>ws).underlying_transport, 4)
    if not PyDict_Next(targets, &p, &k2, NULL):
        return
    if Py_TYPE(k2) == <PyTypeObject*>Target:
        ws = <PyObject*>(<Target>k2)._ws
        if ws != <PyObject*>None:
            _prefetch(ws, 4)
    if PyDict_Next(targets, &p, &k3, NULL):
        _prefetch(k3, 2)


cdef Py_ssize_t _broadcast(dict targets, bytearray plain, bytearray compressed, object account_id,
                           object type_states) except -1:
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t size = PyDict_GET_SIZE(targets)
    cdef Py_ssize_t written = 0
    cdef PyObject* key
    cdef PyObject* value
    cdef Target target
    cdef object other
    cdef bint have_compressed = compressed is not None
    while PyDict_Next(targets, &pos, &key, &value):
        _prefetch_ahead(targets, pos)
        if type(<object>key) is Target:
            # Holding the reference keeps the target alive even if its send makes someone drop it.
            target = <Target>key
            if target.paused:
                _merge_target(target, account_id, type_states)
            else:
                _write_target(target, plain, compressed, have_compressed)
                written += 1
        else:
            other = <object>key
            if other.paused:
                _merge(other, account_id, type_states)
            else:
                _write_other(other, plain, compressed, have_compressed)
                written += 1
        # A send can run callbacks (pause_writing, errors); if they change the group, stop as a Python
        # `for` loop over the dict would, instead of visiting an arbitrary subset.
        if PyDict_GET_SIZE(targets) != size:
            raise RuntimeError("dictionary changed size during iteration")
    return written
