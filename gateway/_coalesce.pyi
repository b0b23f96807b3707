"""Type stub of the compiled WebSocket message coalescer (native/gateway/_coalesce.pyx).

Its pure-Python twin gateway._coalesce_py has exactly this API and behaviour; no I/O in either.
"""

from typing import Final

CONTINUATION: Final[int]
TEXT: Final[int]
BINARY: Final[int]
CLOSE: Final[int]
PING: Final[int]
PONG: Final[int]

PENDING: Final[int]
MESSAGE: Final[int]
CONTROL: Final[int]
ERROR: Final[int]

def utf8_valid(data: bytes | bytearray | memoryview) -> bool: ...
def json_too_deep(data: bytes | bytearray | memoryview, limit: int) -> bool: ...

class Coalescer:
    def __init__(self, max_size: int, allow_rsv1: bool = False) -> None: ...
    def feed(self, opcode: int, fin: bool, rsv: int, payload: bytes | bytearray | memoryview) -> int: ...
    def take(self) -> bytes: ...
    @property
    def opcode(self) -> int: ...
    @property
    def rsv1(self) -> bool: ...
    @property
    def error_code(self) -> int: ...
    @property
    def error_reason(self) -> str: ...
    @property
    def buffered(self) -> int: ...
