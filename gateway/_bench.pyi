"""Type stub of the compiled benchmark and test helpers (native/gateway/_bench.pyx); no twin, not production."""

from typing import Any

from gateway._broadcast import Target

def is_fast_path(target: Target) -> bool: ...
def floor_send(fds: Any, frame: bytes | bytearray | memoryview) -> int: ...
