"""Pure-Python twin of the compiled push path (`native/gateway/_broadcast.pyx`): identical behaviour.

`broadcast` writes one pre-encoded StateChange frame to every target of a fan-out group, with no
per-recipient encoding, allocation of tasks or awaiting (DESIGN.md §3). A paused target (its socket's write
buffer is over the high-water mark) gets the change merged into its pending StateChange instead: newest state
per account and type wins, so memory per slow client stays bounded by the accounts and types it covers.

`Lane` is the hub's bus handler for the usual event (one account, one plain variant of sessions): it records the
states, encodes the StateChange with its pushState and broadcasts it; anything else goes to the hub's own path.
"""

from __future__ import annotations

from bisect import bisect_left as _bisect_left
from collections.abc import Callable, Sequence
from time import perf_counter as _perf_counter
from typing import Any

import msgspec as _msgspec

from gateway.fanout import pushstate as _pushstate
from gateway.jmap.types import StateChange as _StateChange

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


# --- the one-event push ------------------------------------------------------------------------------------

_WEBSOCKET = 0  # the hub's framing of an RFC 8887 StateChange message (gateway.fanout.hub.WEBSOCKET)

# Upper bounds (seconds) of the fan-out time histogram: a bus batch in to its last write.
FANOUT_BOUNDS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0)


class Stats:
    """Plain counters the metrics layer reads at scrape time; the hub never talks to Prometheus itself (a
    Prometheus observation costs a lock and a search per batch; this costs a few comparisons and an increment)."""

    __slots__ = ("_counts", "events", "fanout_sum", "merged", "pushes")

    def __init__(self) -> None:
        self.events = 0
        self.pushes = 0
        self.merged = 0
        self.fanout_sum = 0.0
        self._counts = [0] * (len(FANOUT_BOUNDS) + 1)  # per bucket (not cumulative); the last is +Inf

    @property
    def fanout_counts(self) -> list[int]:
        return list(self._counts)

    def fanout(self, seconds: float) -> None:
        self._counts[_bisect_left(FANOUT_BOUNDS, seconds)] += 1
        self.fanout_sum += seconds


_encoder = _msgspec.json.Encoder()


def encode_state_change(account_id: str, changed: dict[str, str], states: dict[str, str]) -> bytearray:
    """The plain frame (HEADROOM bytes, then the StateChange JSON) that the Lane writes for one-account sessions:
    `changed` pushed for `account_id`, whose states are `states`."""
    token = _pushstate.encode({account_id: states})
    plain = bytearray(512)  # room for a usual StateChange: encode_into keeps the capacity and sets the length
    _encoder.encode_into(_StateChange(changed={account_id: changed}, pushState=token), plain, HEADROOM)
    return plain


class Lane:
    """The bus handler of the hub (gateway.fanout.hub): takes the usual events itself, hands the others to the hub.

    An event is usual when its owner has one covered account here whose sessions share one variant of plain
    WebSocket pushes: own account, every type (no dataTypes filter). Of a batch, the Lane takes the usual events
    and the hub's batch path the others (in their order); as there, the events of one account in one batch are
    merged (newest state per type wins) into one StateChange, one send(2) per socket. The Lane reads and writes
    the hub's own dicts (never copies of them), so the hub's resume and ledger logic see exactly what its own
    path would have left. While the hub watches reads in flight, every event goes to the hub.
    """

    __slots__ = ("_compress", "_deliver", "_index", "_owners", "_slow", "_states", "_stats", "_watches")

    def __init__(self, *, owners: dict[str, dict[str, int]], states: dict[str, dict[str, str]],
                 index: dict[str, dict[Any, Any]], watches: list[Any], stats: Stats,
                 slow: Callable[[Sequence[Any]], None], deliver: Callable[[str, dict[str, str]], int],
                 compress: Callable[[memoryview], bytes | None] | None = None) -> None:
        self._owners = owners
        self._states = states
        self._index = index
        self._watches = watches
        self._stats = stats
        self._slow = slow
        self._deliver = deliver
        self._compress = compress

    def _usual(self, username: str) -> tuple[str, dict[str, str], Any] | None:
        """(accountId, its live states, its one group) when the owner's events are usual, else None."""
        accounts = self._owners.get(username)
        if accounts is None or len(accounts) != 1:
            return None
        account_id = next(iter(accounts))
        known = self._states.get(account_id)
        groups = self._index.get(account_id)
        if known is None or groups is None or len(groups) != 1:
            return None
        key, group = next(iter(groups.items()))
        if key[1] is not None or key[2] != _WEBSOCKET or len(key[0]) != 1:
            return None
        return account_id, known, group

    def __call__(self, events: Sequence[Any]) -> None:
        started = _perf_counter()
        if self._watches:
            self._slow(events)
            return
        rest: list[Any] = []  # the events the hub's path takes, in order
        merged: dict[str, tuple[dict[str, str], dict[str, str], Any]] = {}
        for event in events:
            found = self._usual(event.username)
            if found is None:
                rest.append(event)
                continue
            account_id, known, group = found
            self._stats.events += 1
            known.update(event.typeStates)
            entry = merged.get(account_id)
            if entry is None:
                merged[account_id] = (dict(event.typeStates), known, group)
            else:
                entry[0].update(event.typeStates)
        if rest:
            self._slow(rest)
        if merged:
            for account_id, (changed, known, group) in merged.items():
                if changed:
                    self._push(account_id, changed, known, group)
            self._stats.fanout(_perf_counter() - started)

    def _push(self, account_id: str, type_states: dict[str, str], known: dict[str, str], group: Any) -> None:
        plain = encode_state_change(account_id, type_states, known)
        targets = group.targets
        compressed = None
        if group.deflate_count and self._compress is not None:
            # Compressed once for every recipient that negotiated permessage-deflate (DESIGN.md §3).
            deflated = self._compress(memoryview(plain)[HEADROOM:])
            if deflated is not None:
                compressed = bytearray(HEADROOM) + deflated
        written = broadcast(targets, plain, compressed, account_id, type_states)
        self._stats.pushes += written
        self._stats.merged += len(targets) - written
