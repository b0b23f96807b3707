"""The hand-off of an authenticated upgrade to picows: one `WSProtocol` that replays the request head, validates
it, answers 101 and from then on feeds frames to our listener.

This is the only place that knows picows' server-protocol constructor (a public class whose positional
signature the stub does not carry), so a picows upgrade touches one function.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from picows import WSAutoPingStrategy, WSListener, WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # public class, absent from the stub

# picows' smallest read buffer (it grows by doubling for larger messages): idle connections dominate memory.
READ_BUFFER_INIT = 2048


class _PicowsLog(logging.LoggerAdapter[logging.Logger]):
    """A logger-like object, so picows does not create a child Logger per connection (idle memory)."""


_LOG = _PicowsLog(logging.getLogger("picows.server"), {})


def hand_off(transport: asyncio.Transport, buffered: bytes, listener: WSListener, extra_headers: dict[str, str],
             max_message: int, log: Any = None) -> bool:
    """Give `transport` to picows with `listener`, replaying `buffered` (the head and anything after it).
    True when picows accepted the upgrade (it answered 101), False when it refused it (it answered 400). `log` is
    what picows logs through (a logger-like object; gateway.logs.PicowsLog keeps clients' mistakes out of ERROR)."""
    response = WSUpgradeResponse.create_101_response(extra_headers=extra_headers)
    protocol: Any = WSProtocol(
        None, None, False, lambda _request: WSUpgradeResponseWithListener(response, listener), log or _LOG,
        # disconnect_on_exception, no handshake timeout (the whole head is already here), no auto-ping (our timer
        # wheel pings), its idle and reply timeouts, strategy, auto-pong on, frame size limit, no extra headers,
        # read buffer.
        True, None, False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE, True, max_message, None,
        READ_BUFFER_INIT)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    data = memoryview(buffered)
    while data:
        buf = protocol.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        protocol.buffer_updated(n)
        data = data[n:]
    transport.resume_reading()
    return protocol.listener is listener
