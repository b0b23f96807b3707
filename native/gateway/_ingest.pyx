# cython: language_level=3
"""The compiled ingest read: the usual read of an NDJSON event stream, from the socket to the bus, with no Python
frame; and the memory bus's synchronous publish.

`Reader` is the asyncio protocol of an ingest connection (gateway.transport.ingest). For the usual read of a
stream (its body goes on, the read brings whole lines and nothing is held back from the read before) it parses the
framing with llhttp (httptools calls `on_body` here), checks the depth (gateway._coalesce), decodes the lines with
msgspec into StateChangeEvents and hands them to the bus's `publish_now`; every other read (a partial line, the
end of the body, a bad line or framing, a broker bus, a finished stream) goes to the Python protocol that owns
it, which has the whole logic. `Dispatch` is the memory bus's `publish_now` (gateway.bus.memory): it hands the
subscribed usernames' events to the bus handler (the hub's Lane, also C).

Its pure-Python twin with identical behaviour is gateway._ingest_py; tests/unit/test_ingest_reader.py and
tests/e2e/test_ingest.py run the same tests on both.
"""

from gateway._coalesce cimport too_deep

import httptools

_ParserError = httptools.HttpParserError


cdef class Reader:
    """The protocol of one ingest connection: every read parsed here, the usual one also published here, the
    rest taken by `owner` (an IngestProtocol).

    `open` says reads are taken at all: the owner sets it False, for good, when the stream finishes or fails, and
    what the client still sends is then dropped. The usual read is published here only when the bus has a
    synchronous publish (`publish` is not None); on a broker bus every read goes to `owner.take()`.
    """

    # Fields are declared in _ingest.pxd.

    def __init__(self, owner, lines, publish, *, decode, Py_ssize_t max_depth):
        self._owner = owner
        self._lines = lines
        self._publish = publish
        self._decode = decode
        self._limit = lines.limit
        self._depth = max_depth
        self.body = []
        self.complete = False
        self.open = True
        self.accepted = 0
        self.parser = httptools.HttpRequestParser(self)

    # --- llhttp's callbacks --------------------------------------------------------------------------------

    def on_body(self, bytes body):
        self.body.append(body)

    def on_message_complete(self):
        self.complete = True

    # --- asyncio -------------------------------------------------------------------------------------------

    def data_received(self, data):
        if not self.open:
            return  # a refused or answered stream lingers: what the client still sends is dropped
        if not self.complete and self.parser is not None:
            try:
                self.parser.feed_data(data)
            except _ParserError as exc:
                self._owner.malformed(exc)  # closes `open`; the lines before the fault are still taken below
        if not self._usual():
            self._owner.take()

    def eof_received(self):
        return self._owner.eof_received()

    def connection_lost(self, exc):
        # The last call of the connection: let go of the owner and the parser (both refer back to this reader),
        # so that a closed stream leaves no cycle for the collector.
        owner = self._owner
        self._owner = None
        self.parser = None
        owner.connection_lost(exc)

    def pause_writing(self):
        pass  # only the answer is written, once, and the connection closes after it

    def resume_writing(self):
        pass

    # --- the usual read ------------------------------------------------------------------------------------

    cdef bint _usual(self) except -1:
        """Publish the read's lines when it is the usual read (True); else leave everything untouched (False).

        The usual read: the body goes on, nothing is held back from the read before, and every body piece of this
        read (one per chunk) ends a line. Its events are published as one batch, as the owner's path would."""
        cdef list body = self.body
        cdef Py_ssize_t count = 0
        if not self.open or self._publish is None or self.complete or len(body) == 0:
            return False
        lines = self._lines
        if lines.failure is not None or len(lines.pending) != 0:
            return False
        if len(body) == 1:
            events = self._lines_of(<bytes>body[0], &count)
            if events is None:
                return False
        else:  # several chunks in one read (a busy injector): decode each, publish them together
            events = []
            for piece in body:
                decoded = self._lines_of(<bytes>piece, &count)
                if decoded is None:
                    return False
                (<list>events).extend(<list>decoded)
        for item in <list>events:
            if type(item) is list:  # a line that is an array of events
                events = _flat(<list>events)
                break
        lines.line = lines.line + count
        body.clear()
        if len(<list>events) == 0:
            return True
        try:
            self._publish(events)
        except Exception as exc:
            self._owner.publish_failed(exc)
            return True
        self.accepted += len(<list>events)
        return True

    cdef list _lines_of(self, bytes piece, Py_ssize_t* count):
        """The decoded lines of a piece of whole lines (adding its newlines to `count`), or None when the piece is
        not that (a partial line, one over the limit, too deep, or a line that msgspec refuses: the owner's path
        reads it again and says which line)."""
        cdef Py_ssize_t n = len(piece), i, newlines = 0
        cdef const unsigned char* p = <const unsigned char*>piece
        if n == 0 or n > self._limit or p[n - 1] != 0x0A:
            return None
        if too_deep(p, n, self._depth):
            return None
        try:
            decoded = self._decode(piece)
        except Exception:
            return None  # an older James's fields, or a bad line
        with nogil:
            for i in range(n):
                if p[i] == 0x0A:
                    newlines += 1
        count[0] += newlines
        return <list>decoded


cdef list _flat(list decoded):
    """Lines that are arrays of events spread into one list of events."""
    cdef list events = []
    for item in decoded:
        if type(item) is list:
            events.extend(<list>item)
        else:
            events.append(item)
    return events


cdef class Dispatch:
    """The memory bus's `publish_now`: the events of subscribed usernames go to `handler` (None: the bus is
    stopped, and nothing goes anywhere). `published` counts every event offered."""

    # Fields are declared in _ingest.pxd.

    def __init__(self, set subscribed):
        self._subscribed = subscribed
        self.handler = None
        self.published = 0

    def __call__(self, events):
        handler = self.handler
        if handler is None:
            return
        self.published += len(events)
        cdef set subscribed = self._subscribed
        if len(events) == 1:  # the usual read of an ingest stream: no filtered copy
            if events[0].username in subscribed:
                handler(events)
            return
        wanted = [e for e in events if e.username in subscribed]
        if wanted:
            handler(wanted)
