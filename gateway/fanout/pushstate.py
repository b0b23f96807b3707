"""The `pushState` resume cursor (RFC 8887 §4.3.5): self-contained, so it is valid on any gateway node.

A token encodes what the client has been told: accountId -> type name -> state, for the accounts and types its
push covers. It is a versioned, URL-safe base64 of a msgpack map. Tokens are cursors, not credentials: a forged
one can only make the gateway send its holder more or fewer StateChanges for accounts it may already read. No I/O.
"""

from __future__ import annotations

import base64
import binascii

import msgspec

_VERSION = "1"
_decoder = msgspec.msgpack.Decoder(dict[str, dict[str, str]])
_encoder = msgspec.msgpack.Encoder()


_URLSAFE = bytes.maketrans(b"+/", b"-_")


_scratch = bytearray(256)  # msgpack of one token, reused: encode_into grows it once instead of every push


def encode(states: dict[str, dict[str, str]]) -> str:
    # binascii and one translate: what base64.urlsafe_b64encode does, without its Python layers (once per push).
    _encoder.encode_into(states, _scratch)
    return _VERSION + binascii.b2a_base64(_scratch, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def decode(token: str) -> dict[str, dict[str, str]] | None:
    """The states inside a token, or None when it cannot be read (the caller then sends the full state)."""
    if not token.startswith(_VERSION):
        return None
    body = token[len(_VERSION):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return None


def diff(current: dict[str, dict[str, str]], told: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]]:
    """The types whose current state differs from what the client was told (everything when told is None)."""
    if told is None:
        return {acc: dict(types) for acc, types in current.items() if types}
    out: dict[str, dict[str, str]] = {}
    for acc, types in current.items():
        known = told.get(acc, {})
        changed = {t: s for t, s in types.items() if known.get(t) != s}
        if changed:
            out[acc] = changed
    return out
