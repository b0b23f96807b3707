"""The hub: accountId -> push-enabled sessions, fed by the bus, writing each StateChange once per variant.

Flow (one way): bus -> `Hub.on_events` -> per account, per variant group -> one encoded frame -> `broadcast` to
every target of the group. A variant is what makes the bytes differ: the session's covered accounts (they shape
the pushState token) and its dataTypes filter. Sessions of one account with the same coverage and filter share
one group, so an event for an account with 10,000 sessions is encoded once and written 10,000 times.

The hub keeps the last state seen per account and type (for tokens and resumes), subscribes the bus to a
username when the first local session covering that user's account enables push, and unsubscribes after the
last one leaves. It never awaits on the delivery path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any

import msgspec

from gateway.bus.base import Bus
from gateway.bus.events import StateChangeEvent
from gateway.directory import Principal, account_id_for
from gateway.fanout import pushstate
from gateway.jmap.types import StateChange

log = logging.getLogger(__name__)

StatesSource = Callable[[Principal, Sequence[str]], Awaitable[dict[str, dict[str, str]]]]
VariantKey = tuple[tuple[str, ...], frozenset[str] | None]

HEADROOM = 14
TEXT = 1


class HubStats:
    """Plain counters the metrics layer reads; the hub never talks to Prometheus itself."""

    __slots__ = ("events", "fanout_seconds", "merged", "pushes")

    def __init__(self) -> None:
        self.events = 0
        self.pushes = 0
        self.merged = 0
        self.fanout_seconds: Callable[[float], None] = lambda _s: None


class Subscription:
    __slots__ = ("data_types", "key", "principal", "target")

    def __init__(self, target: Any, principal: Principal, data_types: frozenset[str] | None) -> None:
        self.target = target
        self.principal = principal
        self.data_types = data_types
        self.key: VariantKey = (tuple(principal.account_ids), data_types)


class Group:
    """The targets sharing one variant for one account."""

    __slots__ = ("deflate_count", "targets")

    def __init__(self) -> None:
        self.targets: dict[Any, None] = {}
        self.deflate_count = 0


def _filter(states: dict[str, str], types: frozenset[str] | None) -> dict[str, str]:
    if types is None:
        return states
    return {t: s for t, s in states.items() if t in types}


class Hub:
    def __init__(self, bus: Bus, states_source: StatesSource, broadcast_impl: ModuleType, *,
                 coalesce_ms: int = 0, compress: Callable[[memoryview], bytes | None] | None = None) -> None:
        self._bus = bus
        self._states_source = states_source
        self._broadcast = broadcast_impl.broadcast
        self._merge = broadcast_impl.merge
        self._coalesce = coalesce_ms / 1000.0
        self._compress = compress
        self.stats = HubStats()
        self._index: dict[str, dict[VariantKey, Group]] = {}
        self._subs: dict[Any, Subscription] = {}  # target -> its subscription
        self._owner_refs: dict[str, int] = {}
        self._states: dict[str, dict[str, str]] = {}  # last state seen, per account and type
        self._account_ids: dict[str, str] = {}  # username -> accountId (sha256 is worth caching)
        self._window: dict[str, dict[str, str]] = {}
        self._window_handle: asyncio.TimerHandle | None = None
        self._encoder = msgspec.json.Encoder()

    # --- registration --------------------------------------------------------------------------------------

    @property
    def subscriptions(self) -> int:
        return len(self._subs)

    def is_enabled(self, target: Any) -> bool:
        return target in self._subs

    def subscription(self, target: Any) -> Subscription | None:
        return self._subs.get(target)

    async def enable(self, target: Any, principal: Principal, data_types: frozenset[str] | None,
                     push_state: str | None, still_open: Callable[[], bool]) -> None:
        """RFC 8887 §4.3.5.2: (re)place the session's subscription; resume from `push_state` if given."""
        self.disable(target)  # a second enable replaces the first (DESIGN.md §4)
        sub = Subscription(target, principal, data_types)
        accounts = list(sub.key[0])
        # Register first, so that no event arriving while we ask for the current states is missed.
        self._register(sub)
        if push_state is None and all(self._states.get(acc) for acc in accounts):
            # Nothing to resume and the states are known already: no call to the request path (in front mode an
            # upstream request per enable, which a reconnect storm would multiply).
            return
        try:
            current = await self._states_source(principal, accounts)
        except Exception:
            log.exception("could not read the current states for %s; resuming from the last seen", principal.username)
            current = {}
        if self._subs.get(target) is not sub or not still_open():
            return  # disabled, replaced or disconnected while we waited
        for acc in accounts:
            known = self._states.setdefault(acc, {})
            for t, s in current.get(acc, {}).items():
                known.setdefault(t, s)  # states seen on the bus are at least as new
        if push_state is None:
            return
        told = pushstate.decode(push_state)
        snapshot = self._snapshot(sub.key)
        missed = pushstate.diff(snapshot, told)
        if missed:
            self._merge_into(target, missed)
            if not target.paused:
                self.flush(target)

    def _register(self, sub: Subscription) -> None:
        target = sub.target
        self._subs[target] = sub
        target.key = sub.key
        for acc in sub.key[0]:
            group = self._index.setdefault(acc, {}).get(sub.key)
            if group is None:
                group = self._index[acc][sub.key] = Group()
            group.targets[target] = None
            if target.deflate:
                group.deflate_count += 1
        for account in sub.principal.accounts:
            n = self._owner_refs.get(account.owner, 0)
            self._owner_refs[account.owner] = n + 1
            if n == 0:
                self._bus.subscribe(account.owner)

    def disable(self, target: Any) -> None:
        """RFC 8887 §4.3.5.3, and on disconnect: forget the session; unsubscribe the bus when it was the last."""
        sub = self._subs.pop(target, None)
        if sub is None:
            return
        target.pending = None
        for acc in sub.key[0]:
            groups = self._index.get(acc)
            if groups is None:
                continue
            group = groups.get(sub.key)
            if group is not None and target in group.targets:
                del group.targets[target]
                if target.deflate:
                    group.deflate_count -= 1
                if not group.targets:
                    del groups[sub.key]
            if not groups:
                del self._index[acc]
        for account in sub.principal.accounts:
            n = self._owner_refs.get(account.owner, 0) - 1
            if n <= 0:
                self._owner_refs.pop(account.owner, None)
                self._bus.unsubscribe(account.owner)
            else:
                self._owner_refs[account.owner] = n

    # --- delivery ------------------------------------------------------------------------------------------

    def account_id(self, username: str) -> str:
        acc = self._account_ids.get(username)
        if acc is None:
            if len(self._account_ids) > 100_000:
                self._account_ids.clear()
            acc = self._account_ids[username] = account_id_for(username)
        return acc

    def on_events(self, events: Sequence[StateChangeEvent]) -> None:
        """The bus handler: take events synchronously (never awaits)."""
        for event in events:
            self.stats.events += 1
            acc = self.account_id(event.username)
            known = self._states.get(acc)
            if known is None:
                if acc not in self._index:
                    continue  # nobody here covers this account: nothing to remember
                known = self._states[acc] = {}
            known.update(event.typeStates)
            if self._coalesce:
                self._window.setdefault(acc, {}).update(event.typeStates)
                if self._window_handle is None:
                    self._window_handle = asyncio.get_running_loop().call_later(self._coalesce, self._flush_window)
                continue
            self.deliver(acc, event.typeStates)

    def _flush_window(self) -> None:
        # GATEWAY_PUSH_COALESCE_MS: every change of the window goes out as one StateChange per account.
        self._window_handle = None
        window, self._window = self._window, {}
        for acc, states in window.items():
            self.deliver(acc, states)

    def deliver(self, account_id: str, type_states: dict[str, str]) -> int:
        """Write one StateChange per variant of `account_id` to all its targets. Returns targets written."""
        groups = self._index.get(account_id)
        if not groups:
            return 0
        started = time.perf_counter()
        written = 0
        total = 0
        for key, group in list(groups.items()):
            changed = _filter(type_states, key[1])
            if not changed:
                continue
            message = StateChange(changed={account_id: changed}, pushState=pushstate.encode(self._snapshot(key)))
            plain = bytearray(HEADROOM)
            self._encoder.encode_into(message, plain, HEADROOM)
            compressed = None
            if group.deflate_count and self._compress is not None:
                # Compress once for every recipient that negotiated permessage-deflate (DESIGN.md §3).
                deflated = self._compress(memoryview(plain)[HEADROOM:])
                if deflated is not None:
                    compressed = bytearray(HEADROOM) + deflated
            written += self._broadcast(group.targets, plain, compressed, account_id, changed)
            total += len(group.targets)
        self.stats.pushes += written
        self.stats.merged += total - written
        self.stats.fanout_seconds(time.perf_counter() - started)
        return written

    def _snapshot(self, key: VariantKey) -> dict[str, dict[str, str]]:
        accounts, types = key
        return {acc: _filter(self._states.get(acc, {}), types) for acc in accounts}

    def _merge_into(self, target: Any, changes: dict[str, dict[str, str]]) -> None:
        for acc, states in changes.items():
            self._merge(target, acc, states)

    def flush(self, target: Any) -> bytes | None:
        """Send a target's pending StateChange (after its socket drained). Returns the bytes sent, if any."""
        pending = target.pending
        if not pending:
            return None
        target.pending = None
        sub = self._subs.get(target)
        if sub is None:
            return None
        token = pushstate.encode(self._snapshot(sub.key))
        payload = self._encoder.encode(StateChange(changed=pending, pushState=token))
        self.send_one(target, payload)
        self.stats.pushes += 1
        return payload

    def send_one(self, target: Any, payload: bytes) -> None:
        """Write one message to one target, compressed when it negotiated permessage-deflate."""
        if target.deflate and self._compress is not None:
            deflated = self._compress(memoryview(payload))
            if deflated is not None:
                target.transport.send(TEXT, deflated, True, True)
                return
        target.transport.send(TEXT, payload)

    # --- gaps ----------------------------------------------------------------------------------------------

    def on_gap(self) -> None:
        """The bus may have lost events: re-read the current states and push whatever differs."""
        asyncio.get_running_loop().create_task(self.resync())

    async def resync(self) -> None:
        by_principal: dict[str, tuple[Principal, set[str]]] = {}
        for sub in self._subs.values():
            entry = by_principal.setdefault(sub.principal.username, (sub.principal, set()))
            entry[1].update(sub.key[0])
        for principal, accounts in by_principal.values():
            try:
                current = await self._states_source(principal, sorted(accounts))
            except Exception:
                log.exception("resync: could not read the current states of %s", principal.username)
                continue
            for acc, states in current.items():
                known = self._states.setdefault(acc, {})
                changed = {t: s for t, s in states.items() if known.get(t) != s}
                if changed:
                    known.update(changed)
                    self.deliver(acc, changed)
