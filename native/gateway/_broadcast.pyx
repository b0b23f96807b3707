# cython: language_level=3
"""The compiled push path: the broadcast loop, which writes one pre-encoded StateChange frame to every target of a
fan-out group and merges the change into the pending StateChange of targets whose socket is paused; and the Lane,
which takes the usual event (one account, one plain variant of sessions) from the bus to that loop in C.

It owns no sockets; the hub owns the index and the states that the Lane reads and writes. Its pure-Python twin
with identical behaviour is gateway._broadcast_py; tests/unit/test_broadcast.py and tests/unit/test_lane.py run
the same tests on both.
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


# --- the one-event push ------------------------------------------------------------------------------------
#
# Most events name one account whose sessions share one plain variant (their own account, every type, WebSocket
# framing). For those, the Lane below does in C what the hub's Python path does per event: record the states,
# encode the StateChange and its pushState, write the group. Everything else goes to the hub.

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from cpython.dict cimport PyDict_Update
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_Check
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


cdef enum:
    _WEBSOCKET = 0  # the hub's framing of an RFC 8887 StateChange message (gateway.fanout.hub.WEBSOCKET)
    _BOUNDS = 11
    _FRAME_ROOM = 512  # pymalloc serves up to 512 bytes; a bytearray of this capacity allocates one more

# Upper bounds (seconds) of the fan-out time histogram: a bus batch in to its last write.
FANOUT_BOUNDS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0)
cdef double[_BOUNDS] _bounds = [1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0]


cdef class Stats:
    """Plain counters the metrics layer reads at scrape time; the hub never talks to Prometheus itself (a
    Prometheus observation costs a lock and a search per batch; this costs a few comparisons and an increment)."""

    cdef public long long events
    cdef public long long pushes
    cdef public long long merged
    cdef public double fanout_sum
    cdef long long _counts[_BOUNDS + 1]  # per bucket (not cumulative); the last is +Inf

    def __init__(self):
        self.events = self.pushes = self.merged = 0
        self.fanout_sum = 0.0
        memset(self._counts, 0, sizeof(self._counts))

    @property
    def fanout_counts(self):
        return [self._counts[i] for i in range(_BOUNDS + 1)]

    def fanout(self, double seconds):
        self._fanout(seconds)

    cdef inline void _fanout(self, double seconds) noexcept:
        # bisect_left: the first bucket whose bound is >= seconds.
        cdef int i = 0
        while i < _BOUNDS and _bounds[i] < seconds:
            i += 1
        self._counts[i] += 1
        self.fanout_sum += seconds


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)  # what time.perf_counter reads on Linux
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef struct Buf:
    char* data
    Py_ssize_t size
    Py_ssize_t cap


cdef int _room(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef char* data
    if b.size + extra <= b.cap:
        return 0
    cap = max(2 * b.cap, b.size + extra, 512)
    data = <char*>PyMem_Realloc(b.data, cap)
    if data == NULL:
        raise MemoryError()
    b.data = data
    b.cap = cap
    return 0


cdef inline int _put(Buf* b, const char* s, Py_ssize_t n) except -1:
    _room(b, n)
    memcpy(b.data + b.size, s, n)
    b.size += n
    return 0


cdef const char* _HEX = b"0123456789abcdef"


cdef int _json_str(Buf* b, object s) except -1:
    """A JSON string exactly as msgspec writes it: UTF-8 as is; `"`, `\\` and the controls escaped (RFC 8259 §7),
    with the short forms for \\b \\t \\n \\f \\r and lowercase \\u00XX for the rest."""
    cdef Py_ssize_t n, i
    cdef const unsigned char* p
    cdef unsigned char c
    cdef char* out
    if not PyUnicode_Check(s):
        raise TypeError("not a str")
    p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &n)  # raises for lone surrogates, as msgspec does
    _room(b, 6 * n + 2)
    out = b.data + b.size
    out[0] = b'"'
    out += 1
    for i in range(n):
        c = p[i]
        if c >= 0x20 and c != 0x22 and c != 0x5c:
            out[0] = <char>c
            out += 1
            continue
        out[0] = b'\\'
        if c == 0x22 or c == 0x5c:
            out[1] = <char>c
        elif c == 0x08:
            out[1] = b'b'
        elif c == 0x09:
            out[1] = b't'
        elif c == 0x0a:
            out[1] = b'n'
        elif c == 0x0c:
            out[1] = b'f'
        elif c == 0x0d:
            out[1] = b'r'
        else:
            out[1] = b'u'
            out[2] = b'0'
            out[3] = b'0'
            out[4] = _HEX[c >> 4]
            out[5] = _HEX[c & 15]
            out += 6
            continue
        out += 2
    out[0] = b'"'
    b.size = out + 1 - b.data
    return 0


cdef int _pack_len(Buf* b, Py_ssize_t n, unsigned char tag16, unsigned char tag32) except -1:
    """A msgpack header with a 16- or 32-bit big-endian length: `tag16` below 65536, `tag32` from there."""
    cdef unsigned char* h
    _room(b, 5)
    h = <unsigned char*>(b.data + b.size)
    if n < 0x10000:
        h[0] = tag16
        h[1] = n >> 8
        h[2] = n & 0xff
        b.size += 3
    else:
        h[0] = tag32
        h[1] = (n >> 24) & 0xff
        h[2] = (n >> 16) & 0xff
        h[3] = (n >> 8) & 0xff
        h[4] = n & 0xff
        b.size += 5
    return 0


cdef int _pack_str(Buf* b, object s) except -1:
    """A msgpack str with the shortest header, as msgspec writes it (fixstr, str 8, str 16, str 32)."""
    cdef Py_ssize_t n
    cdef const char* p
    if not PyUnicode_Check(s):
        raise TypeError("not a str")
    p = PyUnicode_AsUTF8AndSize(s, &n)
    _room(b, n + 5)
    if n < 32:
        b.data[b.size] = <char>(0xa0 | n)
        b.size += 1
    elif n < 0x100:
        b.data[b.size] = <char>0xd9
        b.data[b.size + 1] = <char>n
        b.size += 2
    else:
        _pack_len(b, n, 0xda, 0xdb)
    memcpy(b.data + b.size, p, n)
    b.size += n
    return 0


cdef int _pack_map(Buf* b, Py_ssize_t n) except -1:
    """A msgpack map header (fixmap, map 16, map 32)."""
    cdef char fixmap = <char>(0x80 | n)
    if n < 16:
        return _put(b, &fixmap, 1)
    return _pack_len(b, n, 0xde, 0xdf)


cdef const char* _B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


cdef int _b64url(Buf* b, const unsigned char* p, Py_ssize_t n) except -1:
    """URL-safe base64 (RFC 4648 §5) without padding."""
    cdef Py_ssize_t i = 0
    cdef unsigned int v
    cdef char* out
    _room(b, (n + 2) // 3 * 4)
    out = b.data + b.size
    while i + 3 <= n:
        v = (p[i] << 16) | (p[i + 1] << 8) | p[i + 2]
        out[0] = _B64URL[v >> 18]
        out[1] = _B64URL[(v >> 12) & 63]
        out[2] = _B64URL[(v >> 6) & 63]
        out[3] = _B64URL[v & 63]
        out += 4
        i += 3
    if n - i == 1:
        v = p[i] << 16
        out[0] = _B64URL[v >> 18]
        out[1] = _B64URL[(v >> 12) & 63]
        out += 2
    elif n - i == 2:
        v = (p[i] << 16) | (p[i + 1] << 8)
        out[0] = _B64URL[v >> 18]
        out[1] = _B64URL[(v >> 12) & 63]
        out[2] = _B64URL[(v >> 6) & 63]
        out += 3
    b.size = out - b.data
    return 0


cdef int _json_states(Buf* b, dict states) except -1:
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef bint first = True
    _put(b, b"{", 1)
    while PyDict_Next(states, &pos, &k, &v):
        if not first:
            _put(b, b",", 1)
        first = False
        _json_str(b, <object>k)
        _put(b, b":", 1)
        _json_str(b, <object>v)
    _put(b, b"}", 1)
    return 0


cdef int _pack_states(Buf* b, dict states) except -1:
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    _pack_map(b, PyDict_GET_SIZE(states))
    while PyDict_Next(states, &pos, &k, &v):
        _pack_str(b, <object>k)
        _pack_str(b, <object>v)
    return 0


cdef struct Scratch:
    Buf frame  # HEADROOM bytes, then the StateChange JSON
    Buf token  # the msgpack inside the pushState


cdef int _encode(Scratch* s, object account_id, dict changed, dict states) except -1:
    """The frame of a one-account, every-type session: HEADROOM bytes, then exactly what msgspec writes for
    StateChange(changed={account_id: changed}, pushState=gateway.fanout.pushstate.encode({account_id: states}))."""
    s.frame.size = 0
    s.token.size = 0
    _room(&s.frame, _HEADROOM)
    memset(s.frame.data, 0, _HEADROOM)
    s.frame.size = _HEADROOM
    _put(&s.frame, b'{"@type":"StateChange","changed":{', 34)
    _json_str(&s.frame, account_id)
    _put(&s.frame, b":", 1)
    _json_states(&s.frame, changed)
    # The pushState (gateway.fanout.pushstate): version "1", then base64url of the msgpack map.
    _put(&s.frame, b'},"pushState":"1', 16)
    _pack_map(&s.token, 1)
    _pack_str(&s.token, account_id)
    _pack_states(&s.token, states)
    _b64url(&s.frame, <const unsigned char*>s.token.data, s.token.size)
    _put(&s.frame, b'"}', 2)
    return 0


def encode_state_change(account_id, dict changed, dict states):
    """The plain frame (HEADROOM bytes, then the StateChange JSON) that the Lane writes for one-account sessions:
    `changed` pushed for `account_id`, whose states are `states`. For tests and benchmarks; the Lane encodes
    into its own scratch buffers."""
    cdef Scratch s
    memset(&s, 0, sizeof(s))
    try:
        _encode(&s, account_id, changed, states)
        return PyByteArray_FromStringAndSize(s.frame.data, s.frame.size)
    finally:
        PyMem_Free(s.frame.data)
        PyMem_Free(s.token.data)


cdef class Lane:
    """The bus handler of the hub (gateway.fanout.hub): takes the usual events in C, hands the others to the hub.

    An event is usual when its owner has one covered account here whose sessions share one variant of plain
    WebSocket pushes: own account, every type (no dataTypes filter). Of a batch, the Lane takes the usual events
    and the hub's batch path the others (in their order); as there, the events of one account in one batch are
    merged (newest state per type wins) into one StateChange, one send(2) per socket. The Lane reads and writes
    the hub's own dicts (never copies of them), so the hub's resume and ledger logic see exactly what its own
    path would have left. While the hub watches reads in flight, every event goes to the hub.
    """

    cdef dict _owners     # owner username -> {accountId: subscriptions covering it}
    cdef dict _states     # accountId -> live states of a covered account
    cdef dict _index      # accountId -> {variant key: group}
    cdef list _watches    # reads in flight (non-empty: the hub's path)
    cdef Stats _stats
    cdef object _slow     # the hub's batch path
    cdef object _deliver  # the hub's deliver(account_id, type_states)
    cdef object _compress  # permessage-deflate for groups with such recipients, or None
    cdef Scratch _scratch

    def __cinit__(self):
        memset(&self._scratch, 0, sizeof(Scratch))

    def __init__(self, *, dict owners, dict states, dict index, list watches, Stats stats, slow, deliver,
                 compress=None):
        self._owners = owners
        self._states = states
        self._index = index
        self._watches = watches
        self._stats = stats
        self._slow = slow
        self._deliver = deliver
        self._compress = compress

    def __dealloc__(self):
        PyMem_Free(self._scratch.frame.data)
        PyMem_Free(self._scratch.token.data)

    cdef tuple _usual(self, object username):
        """(accountId, its live states, its one group) when the owner's events are usual, else None."""
        cdef Py_ssize_t pos = 0
        cdef PyObject* acc_p
        cdef PyObject* key_p
        cdef PyObject* group_p
        accounts = self._owners.get(username)
        if accounts is None or PyDict_GET_SIZE(accounts) != 1:
            return None
        PyDict_Next(accounts, &pos, &acc_p, NULL)
        account_id = <object>acc_p
        known = self._states.get(account_id)
        groups = self._index.get(account_id)
        if known is None or groups is None or PyDict_GET_SIZE(groups) != 1:
            return None
        pos = 0
        PyDict_Next(groups, &pos, &key_p, &group_p)
        key = <tuple>key_p
        if key[1] is not None or key[2] != _WEBSOCKET or len(<tuple>key[0]) != 1:
            return None
        return (account_id, known, <object>group_p)

    def __call__(self, events):
        cdef double started = _now()
        cdef tuple found
        if self._watches:
            self._slow(events)
            return
        if len(events) != 1:
            self._batch(events, started)
            return
        event = events[0]
        found = self._usual(event.username)
        if found is None:
            self._slow(events)
            return
        type_states = event.typeStates
        self._stats.events += 1
        PyDict_Update(found[1], type_states)
        if type_states:
            self._push(found[0], type_states, found[1], found[2])
        self._stats._fanout(_now() - started)

    cdef int _batch(self, events, double started) except -1:
        cdef list rest = None  # the events the hub's path takes, in order
        cdef dict merged = None  # accountId -> [changed, live states, group, changed is a copy]
        cdef tuple found
        cdef list entry
        for event in events:
            found = self._usual(event.username)
            if found is None:
                if rest is None:
                    rest = []
                rest.append(event)
                continue
            type_states = event.typeStates
            self._stats.events += 1
            PyDict_Update(found[1], type_states)
            if merged is None:
                merged = {}
            entry = merged.get(found[0])
            if entry is None:
                merged[found[0]] = [type_states, found[1], found[2], False]
            else:
                if not entry[3]:
                    entry[0] = dict(entry[0])  # copied only when a second event of the account comes
                    entry[3] = True
                PyDict_Update(entry[0], type_states)
        if rest is not None:
            self._slow(rest)
        if merged is not None:
            for account_id, entry in merged.items():
                if entry[0]:
                    self._push(account_id, entry[0], entry[1], entry[2])
            self._stats._fanout(_now() - started)
        return 0

    cdef int _push(self, object account_id, dict type_states, dict known, object group) except -1:
        cdef Py_ssize_t written
        cdef bytearray compressed = None
        try:
            _encode(&self._scratch, account_id, type_states, known)
        except (TypeError, UnicodeError):
            # Not strings (or not encodable): the hub's path says so with msgspec's own error.
            self._deliver(account_id, type_states)
            return 0
        # At least _FRAME_ROOM bytes, so that the frame comes from the system allocator and not from pymalloc's
        # small-object pools: written to 1,000 sockets, a pooled frame cost 6% of the deliveries per CPU-second
        # in the fan-out harness (k = 1,000, 0.94x paired against the commit before the Lane, twice; 0.97-1.00x
        # with this, as the old path's bytearray(512) had). Why is not known; the broadcast loop's own
        # benchmark, with one prebuilt frame, is the same for both.
        plain = PyByteArray_FromStringAndSize(NULL, max(self._scratch.frame.size, _FRAME_ROOM))
        PyByteArray_Resize(plain, self._scratch.frame.size)
        memcpy(PyByteArray_AS_STRING(plain), self._scratch.frame.data, self._scratch.frame.size)
        targets = group.targets
        if group.deflate_count and self._compress is not None:
            # Compressed once for every recipient that negotiated permessage-deflate (DESIGN.md §3).
            deflated = self._compress(memoryview(plain)[_HEADROOM:])
            if deflated is not None:
                compressed = bytearray(_HEADROOM) + deflated
        written = _broadcast(targets, plain, compressed, account_id, type_states)
        self._stats.pushes += written
        self._stats.merged += PyDict_GET_SIZE(targets) - written
        return 0
