"""Compiled RFC 7692 §7.2 compress/inflate framing on zlib's C API (twin: gateway._deflate_py)."""

from gateway.deflate import Corrupt as Corrupt
from gateway.deflate import TooBig as TooBig

ZLIB_VERSION: str

class Compressor:
    def __init__(self, level: int, wbits: int) -> None: ...
    def compress(self, data: bytes | bytearray | memoryview) -> bytes: ...

class Inflater:
    def __init__(self, wbits: int = 15) -> None: ...
    def inflate(self, data: bytes | bytearray | memoryview, max_size: int) -> bytes: ...
