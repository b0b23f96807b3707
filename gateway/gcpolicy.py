"""The cyclic garbage collector and a process holding many connections: long-lived objects are frozen.

CPython runs a full (generation 2) collection whenever the objects that reached generation 2 have grown by a
quarter since the last one, and a full collection walks every tracked object while the loop stands still. The
objects of held connections are long-lived and never garbage, yet each connection brings dozens of them: with
10,000 sessions a gateway ran 11-12 full collections of 80-190 ms while they connected (bench/README.md), and
the walk grows with the heap (100,000 sessions: seconds without a push or a ping).

So once after start-up, and again whenever the held connections have grown by `GATEWAY_GC_FREEZE_AFTER` since the
last time (checked as each one arrives), `gc.freeze()` moves every tracked object into the permanent generation,
which no collection walks; the young generations first get one collection of their own, so that what is frozen
is what is alive. What is frozen is still freed by its reference count when it goes: a closed connection leaves no
reference cycle behind (tests/e2e/test_teardown.py keeps it so), so freezing costs no memory. Pauses of every
collection are counted for `/metrics`. No I/O.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

# Upper bounds (seconds) of the collection-pause histogram.
PAUSE_BOUNDS = (1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0)


class GcPolicy:
    """Freezes after growth of the held connections, and times every collection (both only while started)."""

    def __init__(self, freeze_after: int, held: Callable[[], int]) -> None:
        self._freeze_after = freeze_after  # 0: never freeze (the collector as CPython runs it)
        self._held = held
        self._held_at_freeze = 0
        self._started_at = 0.0
        self.freezes = 0
        self.pause_counts = [0] * (len(PAUSE_BOUNDS) + 1)  # per bucket, the last is +Inf
        self.pause_sum = 0.0
        self.full_collections = 0

    def start(self) -> None:
        gc.callbacks.append(self._timed)
        if self._freeze_after:
            self.freeze()  # what start-up built (modules, the backend's data, the settings) lives as long

    def stop(self) -> None:
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)

    def check(self) -> None:
        """Freeze if the held connections grew by the setting since the last freeze: called as each connection
        is added, so that a storm of reconnections is frozen as it arrives, before full collections walk it."""
        held = self._held()
        if self._freeze_after and held - self._held_at_freeze >= self._freeze_after:
            self.freeze()
        elif held < self._held_at_freeze:
            self._held_at_freeze = held  # connections went: growth counts from the new level

    def freeze(self) -> None:
        gc.collect(1)  # the young generations' garbage is collected, not frozen (a few ms at most)
        gc.freeze()
        self._held_at_freeze = self._held()
        self.freezes += 1

    @property
    def frozen(self) -> int:
        return gc.get_freeze_count()

    def _timed(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        pause = time.perf_counter() - self._started_at
        self.pause_counts[bisect_left(PAUSE_BOUNDS, pause)] += 1
        self.pause_sum += pause
        if info.get("generation") == 2:
            self.full_collections += 1
