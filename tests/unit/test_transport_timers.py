"""The timer wheel (gateway.transport.timers): one loop timer for every socket's deadlines.

Most tests drive it with a manual clock (the wheel is pure logic over `loop.time()` and `loop.call_at`); the last
one runs it on a real event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from functools import partial
from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from gateway.transport.timers import Alarm, TimerWheel


class Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """The two methods of an event loop the wheel uses, on a clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(when, callback)
        self.handles.append(handle)
        return handle

    @property
    def armed(self) -> list[Handle]:
        return [h for h in self.handles if not h.cancelled]

    def advance(self, to: float) -> None:
        """Move the clock to `to`, running every due handle in the order of its time, as a loop does."""
        self.now = max(self.now, to)
        while True:
            due = [h for h in self.armed if h.when <= self.now]
            if not due:
                return
            handle = min(due, key=lambda h: h.when)
            handle.cancelled = True  # a handle runs once
            handle.callback()


def record(log: list[str], name: str, now: float) -> None:
    log.append(name)


def record_time(log: dict[int, list[float]], key: int, now: float) -> None:
    log.setdefault(key, []).append(now)


def wheel(resolution: float = 1.0) -> tuple[TimerWheel, ManualLoop]:
    loop = ManualLoop()
    return TimerWheel(cast(asyncio.AbstractEventLoop, loop), resolution), loop


def test_a_deadline_fires_at_its_bucket_with_the_loop_time() -> None:
    w, loop = wheel()
    fired: list[float] = []
    w.call_at(2.3, fired.append)
    assert len(w) == 1
    loop.advance(2.9)
    assert fired == []  # rounded up to the resolution: never early
    loop.advance(3.0)
    assert fired == [3.0] and len(w) == 0


def test_one_loop_timer_for_many_deadlines() -> None:
    w, loop = wheel()
    for i in range(1000):
        w.call_at(5 + i % 7, lambda now: None)
    assert len(w) == 1000
    assert [h.when for h in loop.armed] == [5.0]  # one armed handle, at the earliest bucket


def test_an_earlier_deadline_rearms_and_a_later_one_does_not() -> None:
    w, loop = wheel()
    w.call_at(10, lambda now: None)
    w.call_at(4, lambda now: None)
    assert [h.when for h in loop.armed] == [4.0]
    w.call_at(8, lambda now: None)
    assert [h.when for h in loop.armed] == [4.0]
    loop.advance(4)
    assert [h.when for h in loop.armed] == [8.0]  # the next bucket after firing


def test_due_buckets_fire_in_order_and_entries_of_a_bucket_in_insertion_order() -> None:
    w, loop = wheel()
    order: list[str] = []
    for name, when in (("c", 3.0), ("a1", 1.0), ("b", 2.0), ("a2", 0.5)):
        w.call_at(when, partial(record, order, name))
    loop.advance(10)  # late: every bucket is due at once
    assert order == ["a1", "a2", "b", "c"]


def test_a_callback_may_schedule_again() -> None:
    w, loop = wheel()
    seen: list[float] = []

    def ping(now: float) -> None:
        seen.append(now)
        if len(seen) < 3:
            w.call_at(now + 5, ping)  # keepalive: the next ping from inside the callback

    w.call_at(5, ping)
    for t in range(1, 30):
        loop.advance(t)
    assert seen == [5.0, 10.0, 15.0] and len(w) == 0 and loop.armed == []


def test_an_alarm_keeps_one_wake_up_and_drops_the_superseded_one() -> None:
    w, loop = wheel()
    fired: list[float] = []
    alarm = Alarm(lambda: w, fired.append)
    alarm.arm(5.0)
    alarm.arm(7.0)  # later than the pending one: nothing new is scheduled
    assert len(w) == 1
    alarm.arm(2.0)  # earlier: scheduled; the 5.0 entry stays on the wheel but is stale now
    assert len(w) == 2
    loop.advance(2.5)
    assert fired == [2.5]
    loop.advance(6.0)
    assert fired == [2.5]  # the superseded 5.0 wake-up did not ring
    alarm.arm(8.0)  # after a ring the alarm is free again
    loop.advance(9.0)
    assert fired == [2.5, 9.0]


def test_close_drops_everything() -> None:
    w, loop = wheel()
    fired: list[float] = []
    w.call_at(1, fired.append)
    w.close()
    loop.advance(5)
    assert fired == [] and len(w) == 0 and loop.armed == []


def test_a_finer_resolution() -> None:
    w, loop = wheel(0.25)
    fired: list[float] = []
    w.call_at(0.3, fired.append)
    loop.advance(0.49)
    assert fired == []
    loop.advance(0.5)
    assert fired == [0.5]


WHENS = st.floats(min_value=0, max_value=50, allow_nan=False)


@given(resolution=st.sampled_from([0.5, 1.0, 2.0]),
       entries=st.lists(WHENS, max_size=30),
       steps=st.lists(WHENS, min_size=1, max_size=15))
def test_every_entry_fires_once_at_the_first_step_past_its_bucket(resolution: float, entries: list[float],
                                                                    steps: list[float]) -> None:
    w, loop = wheel(resolution)
    fired: dict[int, list[float]] = {}
    for i, when in enumerate(entries):
        w.call_at(when, partial(record_time, fired, i))
    clock = 0.0
    expected: dict[int, list[float]] = {}
    for step in sorted(steps):
        clock = step
        loop.advance(clock)
        for i, when in enumerate(entries):
            if i not in expected and math.ceil(when / resolution) * resolution <= clock:
                expected[i] = [clock]
        assert fired == expected
        assert len(loop.armed) <= 1  # never more than one loop timer
    assert len(w) == len(entries) - len(expected)


async def test_on_a_real_loop() -> None:
    loop = asyncio.get_running_loop()
    w = TimerWheel(loop, 0.01)
    fired: asyncio.Future[float] = loop.create_future()
    start = loop.time()
    w.call_at(start + 0.02, fired.set_result)
    now = await asyncio.wait_for(fired, 10)
    assert now >= start + 0.02 and len(w) == 0
    w.close()
