"""Type stub of the compiled push path (native/gateway/_broadcast.pyx): the broadcast loop and the one-event Lane.

Its pure-Python twin gateway._broadcast_py has exactly this public API and behaviour. Target's C-level fields
are declared in native/gateway/_broadcast.pxd; the benchmark and test helpers live in gateway._bench.
"""

from collections.abc import Callable, Sequence
from typing import Any, Final

TEXT: Final[int]
HEADROOM: Final[int]
FANOUT_BOUNDS: Final[tuple[float, ...]]

class Target:
    transport: Any
    deflate: bool
    paused: bool
    pending: dict[str, dict[str, str]] | None
    def __init__(self, transport: Any, deflate: bool = False) -> None: ...

def merge(target: Target, account_id: str, type_states: dict[str, str]) -> None: ...
def broadcast(targets: dict[Target, None], plain: bytearray, compressed: bytearray | None,
              account_id: str, type_states: dict[str, str]) -> int: ...

class Stats:
    events: int
    pushes: int
    merged: int
    fanout_sum: float
    @property
    def fanout_counts(self) -> list[int]: ...
    def fanout(self, seconds: float) -> None: ...

def encode_state_change(account_id: str, changed: dict[str, str], states: dict[str, str]) -> bytearray: ...

class Lane:
    def __init__(self, *, owners: dict[str, dict[str, int]], states: dict[str, dict[str, str]],
                 index: dict[str, dict[Any, Any]], watches: list[Any], stats: Stats,
                 slow: Callable[[Sequence[Any]], None], deliver: Callable[[str, dict[str, str]], int],
                 compress: Callable[[memoryview], bytes | None] | None = None) -> None: ...
    def __call__(self, events: Sequence[Any]) -> None: ...
