"""Pure-Python twin of `gateway._deflate`: the RFC 7692 §7.2 compress/inflate framing on the `zlib` module.

Same API, same output bytes and same exceptions as the compiled module (the tests hold both to that); it is
the reference and the fallback for development, not the production path. No negotiation here
(`gateway.deflate`).
"""

from __future__ import annotations

import zlib

from gateway.deflate import Corrupt, TooBig, validate_compressor, validate_inflater, validate_max_size

__all__ = ["ZLIB_VERSION", "Compressor", "Corrupt", "Inflater", "TooBig"]

ZLIB_VERSION: str = zlib.ZLIB_RUNTIME_VERSION

# RFC 7692 §7.2.1: the empty stored block a sync flush ends with; stripped on send, appended on receive.
_TAIL = b"\x00\x00\xff\xff"
# zlib's default; the compiled module uses the same so that both produce the same bytes.
_MEM_LEVEL = 8


class Compressor:
    """Compresses whole messages, each one independently (no context takeover): equal input, equal bytes."""

    __slots__ = ("_level", "_wbits")

    def __init__(self, level: int, wbits: int) -> None:
        validate_compressor(level, wbits)
        self._level = level
        self._wbits = wbits

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        # RFC 7692 §7.1.1.1 (server_no_context_takeover): every message starts from an empty window. The zlib
        # module has no deflateReset(), so a fresh stream per message plays its part.
        stream = zlib.compressobj(self._level, zlib.DEFLATED, -self._wbits, _MEM_LEVEL,
                                  zlib.Z_DEFAULT_STRATEGY)
        out = stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)
        # RFC 7692 §7.2.1: the data ends with an empty stored block (a sync flush always writes one, which
        # also makes an empty message 0x00, §7.2.3.6); its 4 octets 00 00 ff ff are removed.
        if not out.endswith(_TAIL):  # pragma: no cover - zlib guarantees it
            raise RuntimeError("zlib sync flush did not end with an empty stored block")
        return out[:-4]


class Inflater:
    """Inflates whole messages, each from an empty window (client_no_context_takeover), within a limit."""

    __slots__ = ("_wbits",)

    def __init__(self, wbits: int = 15) -> None:
        validate_inflater(wbits)
        self._wbits = wbits

    def inflate(self, data: bytes | bytearray | memoryview, max_size: int) -> bytes:
        validate_max_size(max_size)
        # RFC 7692 §7.1.1.2 (client_no_context_takeover): a fresh stream per message.
        stream = zlib.decompressobj(-self._wbits)
        try:
            # RFC 7692 §7.2.2: inflate the payload followed by 00 00 ff ff. max_length stops zlib one byte
            # past the limit, so a compression bomb costs at most max_size + 1 bytes of output, not its
            # inflated size. The tail goes in a second call, as the compiled module feeds it, so that a limit
            # reached within the payload wins over anything zlib would have noticed in the tail.
            out = stream.decompress(data, max_size + 1)
            if len(out) > max_size:
                raise TooBig(f"message inflates to more than {max_size} bytes")
            if stream.eof:
                # RFC 7692 §7.2.3.4: the message ended with a BFINAL block; only the 0x00 that opens the empty
                # stored block completed by our tail may follow it.
                if stream.unused_data not in (b"", b"\x00"):
                    raise Corrupt("invalid compressed data: data after the final block")
                return out
            out += stream.decompress(_TAIL, max_size + 1 - len(out))
        except zlib.error as exc:
            raise Corrupt(f"invalid compressed data: {exc}") from exc
        if len(out) > max_size:
            raise TooBig(f"message inflates to more than {max_size} bytes")
        if stream.eof and stream.unused_data != _TAIL:  # the final block ended inside our tail
            raise Corrupt("invalid compressed data: data after the final block")
        return out
