"""Type stub of the compiled broadcast loop (native/gateway/_broadcast.pyx).

Its pure-Python twin gateway._broadcast_py has exactly this public API and behaviour. Target's C-level fields
are declared in native/gateway/_broadcast.pxd; the benchmark and test helpers live in gateway._bench.
"""

from typing import Any, Final

TEXT: Final[int]
HEADROOM: Final[int]

class Target:
    transport: Any
    deflate: bool
    paused: bool
    pending: dict[str, dict[str, str]] | None
    def __init__(self, transport: Any, deflate: bool = False) -> None: ...

def merge(target: Target, account_id: str, type_states: dict[str, str]) -> None: ...
def broadcast(targets: dict[Target, None], plain: bytearray, compressed: bytearray | None,
              account_id: str, type_states: dict[str, str]) -> int: ...
