"""Type stub of the compiled broadcast loop (native/gateway/_broadcast.pyx).

Its pure-Python twin gateway._broadcast_py has exactly this public API and behaviour. The private helpers
exist only in the compiled module: `_is_fast_path` for tests, `_floor_send` for the benchmark's syscall floor.
"""

from typing import Any, Final

TEXT: Final[int]
HEADROOM: Final[int]

class Target:
    transport: Any
    deflate: bool
    paused: bool
    pending: dict[str, dict[str, str]] | None
    key: Any
    def __init__(self, transport: Any, deflate: bool = False) -> None: ...

def merge(target: Target, account_id: str, type_states: dict[str, str]) -> None: ...
def broadcast(targets: dict[Target, None], plain: bytearray, compressed: bytearray | None,
              account_id: str, type_states: dict[str, str]) -> int: ...
def _is_fast_path(target: Target) -> bool: ...
def _floor_send(fds: Any, frame: bytes | bytearray | memoryview) -> int: ...
