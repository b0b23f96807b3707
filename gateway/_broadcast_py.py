"""Pure-Python twin of the compiled broadcast loop (`native/gateway/_broadcast.pyx`): identical behaviour.

`broadcast` writes one pre-encoded StateChange frame to every target of a fan-out group, with no
per-recipient encoding, allocation of tasks or awaiting (DESIGN.md §3). A paused target (its socket's write
buffer is over the high-water mark) gets the change merged into its pending StateChange instead: newest state
per account and type wins, so memory per slow client stays bounded by the accounts and types it covers.
"""

from __future__ import annotations

from typing import Any

TEXT = 1
HEADROOM = 14  # room before the payload for the largest server frame header (RFC 6455 §5.2)


class Target:
    """The push end of one connection: its picows transport and its pause/merge state."""

    __slots__ = ("deflate", "paused", "pending", "transport")

    deflate: bool
    paused: bool

    def __init__(self, transport: Any, deflate: bool = False) -> None:
        self.transport = transport
        self.deflate = deflate
        self.paused = False
        self.pending: dict[str, dict[str, str]] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # The compiled Target holds deflate and paused as C ints (bint, see _broadcast.pxd): whatever is
        # assigned reads back as a bool (a value whose truth cannot be told raises at the assignment). Coerced
        # here on write, so that reads (once per recipient in the loop) stay plain slot reads.
        if name == "deflate" or name == "paused":
            value = bool(value)
        object.__setattr__(self, name, value)


def merge(target: Target, account_id: str, type_states: dict[str, str]) -> None:
    """Fold a change into the target's pending StateChange (newest state wins)."""
    pending = target.pending
    if pending is None:
        target.pending = {account_id: dict(type_states)}
        return
    current = pending.get(account_id)
    if current is None:
        pending[account_id] = dict(type_states)
    else:
        current.update(type_states)


def broadcast(targets: dict[Target, None], plain: bytearray, compressed: bytearray | None,
              account_id: str, type_states: dict[str, str]) -> int:
    """Send the frame to every target; merge it into paused ones. Returns how many were written.

    `targets` is a dict used as an ordered set; a send that changes it (a callback dropping a target) ends the
    loop with RuntimeError after that target, as iterating any dict does.
    """
    # The compiled twin refuses the same arguments with the same messages (picows wants exact bytearrays).
    if type(targets) is not dict:
        raise TypeError("targets must be a dict")
    if type(plain) is not bytearray or (compressed is not None and type(compressed) is not bytearray):
        raise TypeError("plain and compressed must be bytearrays")
    have_compressed = compressed is not None
    written = 0
    for target in targets:
        if target.paused:
            merge(target, account_id, type_states)
            continue
        if have_compressed and target.deflate:
            # RFC 7692 §6: rsv1 marks the compressed message; the payload is shared by every recipient.
            target.transport.send_reuse_external_bytearray(TEXT, compressed, HEADROOM, True, True)
        else:
            target.transport.send_reuse_external_bytearray(TEXT, plain, HEADROOM)
        written += 1
    return written
