"""One timer wheel for every socket (keepalive pings, pong deadlines, slow-client checks).

Not a task or a timer handle per socket: entries land in one-second buckets and a single loop callback fires
each due bucket. Entries are checked lazily when their bucket fires, so moving a deadline (a socket that was
active again) costs nothing until then.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable


class TimerWheel:
    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 1.0) -> None:
        self._loop = loop
        self._resolution = resolution
        self._buckets: dict[int, list[Callable[[float], None]]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._next_tick: int | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def call_at(self, when: float, callback: Callable[[float], None]) -> None:
        """Run `callback(now)` at `when` (loop time), rounded up to the wheel's resolution."""
        tick = math.ceil(when / self._resolution)
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = [callback]
        else:
            bucket.append(callback)
        if self._next_tick is None or tick < self._next_tick:
            self._arm(tick)

    def _arm(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._next_tick = tick
        self._handle = self._loop.call_at(tick * self._resolution, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._next_tick = None
        now = self._loop.time()
        due = [t for t in self._buckets if t * self._resolution <= now]
        for tick in sorted(due):
            for callback in self._buckets.pop(tick):
                callback(now)
        if self._buckets:
            self._arm(min(self._buckets))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._buckets.clear()


class Alarm:
    """One connection's single pending wake-up on a wheel, at the deadline its sans-I/O core reports.

    `arm(due)` schedules only when `due` is earlier than the wake-up already pending; a wake-up that an earlier one
    superseded is dropped when its bucket fires. A deadline that moved later costs nothing until then: the
    connection re-arms after each wake-up."""

    __slots__ = ("_at", "_fire", "_wheel")

    def __init__(self, wheel: Callable[[], TimerWheel], fire: Callable[[float], None]) -> None:
        self._wheel = wheel
        self._fire = fire
        self._at = math.inf

    def arm(self, due: float) -> None:
        if due < self._at:
            self._at = due
            self._wheel().call_at(due, functools.partial(self._ring, due))

    def cancel(self) -> None:
        """The connection is gone: no wake-up, and no reference back to it (the wheel may hold this alarm until
        its bucket fires; the connection is then freed by its reference count, without the cycle collector)."""
        self._at = -math.inf
        self._fire = _ignore

    def _ring(self, when: float, now: float) -> None:
        if when != self._at:
            return  # superseded by an earlier wake-up
        self._at = math.inf
        self._fire(now)


def _ignore(now: float) -> None:
    pass
