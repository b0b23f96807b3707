"""The hub: accountId -> push-enabled sessions, fed by the bus, writing each StateChange once per variant.

Flow (one way): bus -> `Hub.on_events` -> per account, per variant group -> one encoded frame -> `broadcast` to
every target of the group. A variant is what makes the bytes differ: the session's covered accounts (they shape
the pushState token) and its dataTypes filter. Sessions of one account with the same coverage and filter share
one group, so an event for an account with 10,000 sessions is encoded once and written 10,000 times. The usual
event (one account whose sessions share one plain variant) takes the same steps in the broadcast module's `Lane`,
compiled, on the hub's own dicts; the methods here take every other batch.

Which states the hub trusts (DESIGN.md §3 "resume never trusts stale state"):
- An account is *covered* while at least one local session's subscription covers it; the bus is subscribed to its
  owner for exactly that long. Only covered accounts have live states here, and they count as current only once
  the request path's states were read since coverage began (the account is *complete*) and the bus has been
  ready since. A resume on a complete account needs no request-path call; any other account is read first.
- When an account stops being covered, its live states are dropped: from then on the bus no longer tells this
  node what moves. The states of types no request path reports (custom types that only the bus carries, and
  EmailDelivery in front mode) go to a bounded ledger instead: the newest this node saw while it was bound.
- On resume, request-path types come from the (fresh) live states; a type only the bus carries comes from the
  live states when this node has seen it since coverage began, else from the ledger. A ledger state cannot be
  vouched for (the type may have moved while nobody here was bound), so it is pushed even when it equals what
  the client was told; a type this node never saw is not pushed (the client's own state is all there is).
- Events that arrive while a read is in flight win over the read for the types they name: they are at least as
  new, because the bus was bound before the read began and delivers in publish order.

The hub never awaits on the delivery path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Sequence
from types import ModuleType
from typing import Any

import msgspec

from gateway.bus.base import Bus
from gateway.bus.events import StateChangeEvent
from gateway.directory import Principal, account_id_for
from gateway.eventstream import state_event
from gateway.fanout import pushstate
from gateway.jmap.types import StateChange

log = logging.getLogger(__name__)

StatesSource = Callable[[Principal, Sequence[str]], Awaitable[dict[str, dict[str, str]]]]
# (covered accounts, dataTypes filter, framing): what makes the bytes of a push differ.
VariantKey = tuple[tuple[str, ...], frozenset[str] | None, int]
WEBSOCKET, EVENT_SOURCE = 0, 1  # framings: an RFC 8887 StateChange message, an RFC 8620 §7.3 `state` event

HEADROOM = 14
ENCODE_ROOM = 512
TEXT = 1
# Accounts whose bus-only states the ledger keeps after their last session left (about 200 bytes each).
LEDGER_ACCOUNTS = 100_000
# How long a read waits for the bus to confirm a new subscription (RabbitMQ: the binding) before going ahead.
BIND_WAIT = 5.0
# Back-off of re-reading accounts whose states the request path could not give (e.g. the upstream is down).
RETRY_MIN = 1.0
RETRY_MAX = 60.0


class Subscription:
    __slots__ = ("data_types", "key", "principal", "target")

    def __init__(self, target: Any, principal: Principal, data_types: frozenset[str] | None,
                 framing: int = WEBSOCKET) -> None:
        self.target = target
        self.principal = principal
        self.data_types = data_types
        self.key: VariantKey = (tuple(principal.account_ids), data_types, framing)


class Group:
    """The targets sharing one variant for one account."""

    __slots__ = ("deflate_count", "targets")

    def __init__(self) -> None:
        self.targets: dict[Any, None] = {}
        self.deflate_count = 0


_NONE: dict[str, str] = {}  # read only: the states of an account nothing is known of yet


def _filter(states: dict[str, str], types: frozenset[str] | None) -> dict[str, str]:
    if types is None:
        return states
    return {t: s for t, s in states.items() if t in types}


class Hub:
    def __init__(self, bus: Bus, states_source: StatesSource, broadcast_impl: ModuleType, *,
                 coalesce_ms: int = 0, compress: Callable[[memoryview], bytes | None] | None = None,
                 ledger_accounts: int = LEDGER_ACCOUNTS) -> None:
        self._bus = bus
        self._states_source = states_source
        self._broadcast: Callable[..., int] = broadcast_impl.broadcast
        self._merge = broadcast_impl.merge
        self._coalesce = coalesce_ms / 1000.0
        self._compress = compress
        self.stats = broadcast_impl.Stats()
        self._index: dict[str, dict[VariantKey, Group]] = {}
        self._subs: dict[Any, Subscription] = {}  # target -> its subscription
        self._owner_refs: dict[str, int] = {}
        # owner username -> ids of the covered accounts it owns (with the subscriptions covering each): events name
        # the owner; the upstream's session says which id its account has (James: SHA-256 of it; others differ).
        self._owner_accounts: dict[str, dict[str, int]] = {}
        # Live states of covered accounts only (the module docstring says when they are trusted).
        self._states: dict[str, dict[str, str]] = {}
        self._complete: set[str] = set()  # covered accounts read from the request path since coverage began
        self._path_types: set[str] = set()  # type names the request path has reported
        # Last states seen of types only the bus carries, for accounts no longer covered (oldest first).
        self._ledger: dict[str, dict[str, str]] = {}
        self._ledger_max = ledger_accounts
        # Types the bus moved while a read was in flight, per read: they win over the read's answer.
        self._watches: list[dict[str, dict[str, str]]] = []
        self._reads: dict[tuple[str, tuple[str, ...]], asyncio.Task[bool]] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = RETRY_MIN
        self._tasks: set[asyncio.Task[Any]] = set()
        self._account_ids: dict[str, str] = {}  # username -> accountId (sha256 is worth caching)
        self._window: dict[str, dict[str, str]] = {}
        self._window_handle: asyncio.TimerHandle | None = None
        self._encoder = msgspec.json.Encoder()
        # Optional bus hooks (gateway.bus.base): who covers an owner, for a bus that reads with their credentials.
        self._joined: Callable[[str, Principal], None] | None = getattr(bus, "principal_joined", None)
        self._left: Callable[[str, Principal], None] | None = getattr(bus, "principal_left", None)
        # The bus handler. The usual event (one account whose sessions share one plain variant) is taken by the
        # Lane of the broadcast module, compiled: it records the states in the dicts above, encodes and writes
        # with no Python frame per event. It hands every other batch to `_on_batch`; so does a coalescing window.
        self.on_events: Callable[[Sequence[StateChangeEvent]], None] = self._on_batch
        if not self._coalesce:
            self.on_events = broadcast_impl.Lane(
                owners=self._owner_accounts, states=self._states, index=self._index, watches=self._watches,
                stats=self.stats, slow=self._on_batch, deliver=self.deliver, compress=compress)

    # --- registration --------------------------------------------------------------------------------------

    @property
    def subscriptions(self) -> int:
        return len(self._subs)

    def subscription(self, target: Any) -> Subscription | None:
        return self._subs.get(target)

    def principals_of(self, owner: str) -> list[Principal]:
        """The principals of the live subscriptions that cover an account of `owner` (a bus that reads events with
        a client's own credentials, front mode's upstream event streams, picks one). Not for the hot path."""
        if owner not in self._owner_refs:
            return []
        seen: dict[int, Principal] = {}
        for sub in self._subs.values():
            if any(a.owner == owner for a in sub.principal.accounts):
                seen.setdefault(id(sub.principal), sub.principal)
        return list(seen.values())

    def subscribe(self, target: Any, principal: Principal, data_types: frozenset[str] | None,
                  framing: int = WEBSOCKET) -> Subscription:
        """RFC 8887 §4.3.5.2 (and an event-source connection, RFC 8620 §7.3), the synchronous half: (re)place the
        session's subscription now, so that no event arriving from here on is missed. `resume` is the other half."""
        self.disable(target)  # a second enable replaces the first (DESIGN.md §4)
        sub = Subscription(target, principal, data_types, framing)
        self._register(sub)
        return sub

    def resume(self, sub: Subscription, push_state: str | None,
               still_open: Callable[[], bool]) -> Coroutine[Any, Any, None] | None:
        """The rest of an enable, or None when nothing is left to do: read the states of accounts that are not
        complete, then (with `push_state`) push what the client missed."""
        if push_state is None and self._trusted(sub.key[0]):
            # Nothing to resume and the states are current: no request-path call (in front mode an upstream
            # request per enable, which a reconnect storm would multiply).
            return None
        return self._resume(sub, push_state, still_open)

    async def enable(self, target: Any, principal: Principal, data_types: frozenset[str] | None,
                     push_state: str | None, still_open: Callable[[], bool], framing: int = WEBSOCKET) -> None:
        """`subscribe` then `resume`, for callers that simply wait for both."""
        rest = self.resume(self.subscribe(target, principal, data_types, framing), push_state, still_open)
        if rest is not None:
            await rest

    def _trusted(self, accounts: Sequence[str]) -> bool:
        return self._bus.ready and all(acc in self._complete for acc in accounts)

    async def _resume(self, sub: Subscription, push_state: str | None, still_open: Callable[[], bool]) -> None:
        accounts = sub.key[0]
        if not self._trusted(accounts):
            await self._read(sub.principal, accounts)
        if push_state is None or self._subs.get(sub.target) is not sub or not still_open():
            return  # nothing to resume, or disabled, replaced or disconnected while we waited
        missed = self._missed(sub.key, pushstate.decode(push_state))
        if missed:
            self._merge_into(sub.target, missed)
            if not sub.target.paused:
                self.flush(sub.target)

    def _missed(self, key: VariantKey, told: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]]:
        """What a client that was told `told` (None: unreadable token) has to be pushed now."""
        missed = pushstate.diff(self._snapshot(key), told)
        types = key[1]
        for acc in key[0]:
            seen = self._ledger.get(acc)
            if not seen:
                continue
            live = self._states.get(acc, {})
            # Only the bus carries these and nobody here was bound all along: say the newest state we know.
            uncertain = {t: s for t, s in seen.items()
                         if t not in live and t not in self._path_types and (types is None or t in types)}
            if uncertain:
                missed.setdefault(acc, {}).update(uncertain)
        return missed

    def _register(self, sub: Subscription) -> None:
        target = sub.target
        self._subs[target] = sub
        for acc in sub.key[0]:
            groups = self._index.get(acc)
            if groups is None:
                groups = self._index[acc] = {}
                self._states[acc] = {}  # coverage begins: nothing is known until read or seen on the bus
            group = groups.get(sub.key)
            if group is None:
                group = groups[sub.key] = Group()
            group.targets[target] = None
            if target.deflate:
                group.deflate_count += 1
        for account in sub.principal.accounts:
            ids = self._owner_accounts.setdefault(account.owner, {})
            ids[account.id] = ids.get(account.id, 0) + 1
            n = self._owner_refs.get(account.owner, 0)
            self._owner_refs[account.owner] = n + 1
            if self._joined is not None:
                self._joined(account.owner, sub.principal)
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
                self._uncover(acc)
        for account in sub.principal.accounts:
            ids = self._owner_accounts.get(account.owner)
            if ids is not None:
                left = ids.get(account.id, 1) - 1
                if left > 0:
                    ids[account.id] = left
                else:
                    ids.pop(account.id, None)
                    if not ids:
                        del self._owner_accounts[account.owner]
            n = self._owner_refs.get(account.owner, 0) - 1
            if self._left is not None:
                self._left(account.owner, sub.principal)
            if n <= 0:
                self._owner_refs.pop(account.owner, None)
                self._bus.unsubscribe(account.owner)
            else:
                self._owner_refs[account.owner] = n

    def _uncover(self, acc: str) -> None:
        """The account's last local session left: its live states go stale from now on, so they are dropped;
        what only the bus tells is kept in the ledger."""
        self._complete.discard(acc)
        states = self._states.pop(acc, None)
        if states:
            self._remember(acc, states)

    def _remember(self, acc: str, states: dict[str, str]) -> None:
        bus_only = {t: s for t, s in states.items() if t not in self._path_types}
        if not bus_only:
            return
        entry = self._ledger.pop(acc, None)  # re-inserted last: the dict's order is the eviction order
        if entry is None:
            entry = bus_only
        else:
            entry.update(bus_only)
        self._ledger[acc] = entry
        if len(self._ledger) > self._ledger_max:
            del self._ledger[next(iter(self._ledger))]

    # --- reading the request path --------------------------------------------------------------------------

    def _read(self, principal: Principal, accounts: Sequence[str], *, deliver: bool = False) -> asyncio.Task[bool]:
        """Read the current states of `accounts` into the live states (one read in flight per principal and
        accounts: concurrent enables share it). True when the read succeeded."""
        key = (principal.username, tuple(accounts))
        task = self._reads.get(key)
        if task is None or deliver:
            task = asyncio.get_running_loop().create_task(self._read_now(principal, accounts, deliver))
            self._reads[key] = task
            task.add_done_callback(lambda t: self._reads.pop(key) if self._reads.get(key) is t else None)
        return task

    async def _read_now(self, principal: Principal, accounts: Sequence[str], deliver: bool) -> bool:
        owners = {a.owner for a in principal.accounts if a.id in accounts}
        watch: dict[str, dict[str, str]] = {acc: {} for acc in accounts}
        self._watches.append(watch)
        before: dict[str, dict[str, str]] | None = None
        try:
            if self._bus.ready and not all(self._bus.bound(o) for o in owners):
                # Not bound yet: a change between now and the binding would reach this node as no event, and a
                # client that enabled without a pushState would never hear of it. So read now (before any request
                # the client sends after its enable) and again once bound; what moved in between is pushed.
                first = asyncio.ensure_future(self._states_source(principal, accounts))
                try:
                    async with asyncio.timeout(BIND_WAIT):
                        await self._bus.wait_subscribed(owners)
                except TimeoutError:
                    log.warning("the bus did not confirm the subscription of %s within %gs; reading anyway",
                                principal.username, BIND_WAIT, extra={"username": principal.username})
                try:
                    before = await first
                except Exception:
                    before = None  # the second read decides alone
            current = await self._states_source(principal, accounts)
        except Exception as exc:
            log.warning("could not read the current states of %s (%r); trying again in %gs", principal.username,
                        exc, self._retry_delay, extra={"username": principal.username})
            self._schedule_retry()
            return False
        finally:
            self._watches.remove(watch)
        for acc in accounts:
            live = self._states.get(acc)
            if live is None:
                continue  # no longer covered meanwhile
            fresh = current.get(acc, {})
            self._path_types.update(fresh)
            moved = watch[acc]
            changed = {t: s for t, s in fresh.items() if t not in moved and live.get(t) != s}
            live.update(changed)
            self._complete.add(acc)
            push = dict(changed) if deliver else {}
            if before is not None:
                earlier = before.get(acc, {})
                push.update({t: s for t, s in fresh.items() if t not in moved and earlier.get(t) != s})
            if push:
                self.deliver(acc, push)
        return True

    def _schedule_retry(self) -> None:
        # The request path failed (an upstream outage): read every covered account that is not complete again,
        # and push what moved, once it answers; backing off while it does not.
        if self._retry is not None:
            return
        delay = self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        self._retry = asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._spawn(self._read_incomplete())

    async def _read_incomplete(self) -> None:
        by_principal: dict[str, tuple[Principal, set[str]]] = {}
        for sub in self._subs.values():
            wanted = [acc for acc in sub.key[0] if acc not in self._complete]
            if wanted:
                by_principal.setdefault(sub.principal.username, (sub.principal, set()))[1].update(wanted)
        results = await asyncio.gather(*(self._read(p, sorted(accs), deliver=True)
                                         for p, accs in by_principal.values()))
        if all(results):
            self._retry_delay = RETRY_MIN

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- delivery ------------------------------------------------------------------------------------------

    def account_id(self, username: str) -> str:
        acc = self._account_ids.get(username)
        if acc is None:
            if len(self._account_ids) > 100_000:
                self._account_ids.clear()
            acc = self._account_ids[username] = account_id_for(username)
        return acc

    def _on_batch(self, events: Sequence[StateChangeEvent]) -> None:
        """The bus handler's general path: take a batch of events synchronously (never awaits).

        Events of one batch are merged per account first (newest state per type wins, as a paused socket's pending
        push does), so an account moved several times in one batch is encoded once per variant and written once
        per socket: one StateChange, one send(2)."""
        started = time.perf_counter()
        self.stats.events += len(events)
        owners = self._owner_accounts
        merged: dict[str, dict[str, str]] = {}
        for event in events:
            for acc in owners.get(event.username) or self._uncovered(event.username):
                if self._take(acc, event.typeStates) is None:
                    continue
                states = merged.get(acc)
                if states is None:
                    merged[acc] = dict(event.typeStates)
                else:
                    states.update(event.typeStates)
        for acc, states in merged.items():
            self._push(acc, states)
        self.stats.fanout(time.perf_counter() - started)

    def _uncovered(self, username: str) -> tuple[str, ...]:
        """An event for an owner no local session covers: only its ledger entry (James's id) may learn from it."""
        acc = self.account_id(username)
        return (acc,) if acc in self._ledger else ()

    def _take(self, acc: str, type_states: dict[str, str]) -> dict[str, str] | None:
        """Record one event's states; the states to push when a local session covers the account."""
        if self._watches:
            for watch in self._watches:
                moved = watch.get(acc)
                if moved is not None:
                    moved.update(type_states)
        known = self._states.get(acc)
        if known is None:
            # Nobody here covers this account (a delayed unbind): only the ledger may learn something.
            if acc in self._ledger:
                self._remember(acc, type_states)
            return None
        known.update(type_states)
        return type_states

    def _push(self, acc: str, type_states: dict[str, str]) -> None:
        if self._coalesce:
            self._window.setdefault(acc, {}).update(type_states)
            if self._window_handle is None:
                self._window_handle = asyncio.get_running_loop().call_later(self._coalesce, self._flush_window)
            return
        self.deliver(acc, type_states)

    def _flush_window(self) -> None:
        # GATEWAY_PUSH_COALESCE_MS: every change of the window goes out as one StateChange per account.
        self._window_handle = None
        window, self._window = self._window, {}
        for acc, states in window.items():
            self.deliver(acc, states)

    def deliver(self, account_id: str, type_states: dict[str, str]) -> int:
        """Write one StateChange per variant of `account_id` to all its targets. Returns targets written.

        The StateChange is encoded once per (coverage, filter); a WebSocket group and an event-source group of the
        same kind share that JSON and differ only in framing."""
        groups = self._index.get(account_id)
        if not groups:
            return 0
        if len(groups) == 1:
            # The usual account: one variant (its sessions share coverage, filter and framing).
            key, group = next(iter(groups.items()))
            changed = _filter(type_states, key[1])
            if not changed:
                return 0
            plain, compressed = self._frame(group, key, *self._encode(account_id, changed, key))
            written = self._broadcast(group.targets, plain, compressed, account_id, changed)
            self.stats.pushes += written
            self.stats.merged += len(group.targets) - written
            return written
        written = 0
        total = 0
        # Several variants of one account: each (coverage, filter)'s JSON is encoded once, whatever its framings.
        encoded: dict[tuple[tuple[str, ...], frozenset[str] | None], tuple[bytearray, str]] = {}
        for key, group in list(groups.items()):
            changed = _filter(type_states, key[1])
            if not changed:
                continue
            done = encoded.get(key[:2])
            if done is None:
                done = encoded[key[:2]] = self._encode(account_id, changed, key)
            plain, compressed = self._frame(group, key, *done)
            targets = group.targets
            written += self._broadcast(targets, plain, compressed, account_id, changed)
            total += len(targets)
        self.stats.pushes += written
        self.stats.merged += total - written
        return written

    def _frame(self, group: Group, key: VariantKey, raw: bytearray, token: str
               ) -> tuple[bytearray, bytearray | None]:
        """The bytes a group is written (plain, and compressed for its permessage-deflate recipients)."""
        if key[2] == EVENT_SOURCE:
            return bytearray(HEADROOM) + state_event(memoryview(raw)[HEADROOM:], token), None
        compressed = None
        if group.deflate_count and self._compress is not None:
            # Compress once for every recipient that negotiated permessage-deflate (DESIGN.md §3).
            deflated = self._compress(memoryview(raw)[HEADROOM:])
            if deflated is not None:
                compressed = bytearray(HEADROOM) + deflated
        return raw, compressed

    def _encode(self, account_id: str, changed: dict[str, str], key: VariantKey) -> tuple[bytearray, str]:
        """The StateChange JSON after HEADROOM bytes (room for the WebSocket frame header), and its pushState."""
        token = pushstate.encode(self._snapshot(key))
        # Room for a usual StateChange from the start: encode_into keeps the capacity and sets the length.
        plain = bytearray(ENCODE_ROOM)
        self._encoder.encode_into(StateChange(changed={account_id: changed}, pushState=token), plain, HEADROOM)
        return plain, token

    def _snapshot(self, key: VariantKey) -> dict[str, dict[str, str]]:
        accounts, types, _ = key
        if len(accounts) == 1 and types is None:  # the usual session: its own account, every type
            acc = accounts[0]
            return {acc: self._states.get(acc, _NONE)}
        return {acc: _filter(self._states.get(acc, _NONE), types) for acc in accounts}

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
        if sub.key[2] == EVENT_SOURCE:
            payload = state_event(payload, token)
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

    def on_gap(self, owners: Collection[str] | None = None) -> None:
        """The bus may have lost events (of `owners` only, when it says so): those states are not current any more.
        Re-read every such covered account and push whatever differs; states only the bus carries become
        uncertain (ledger)."""
        if owners is None:
            accounts: Iterable[str] = list(self._states)
        else:
            accounts = [acc for owner in owners for acc in self._owner_accounts.get(owner, ())]
        for acc in accounts:
            live = self._states.get(acc)
            if live is None:
                continue
            self._remember(acc, live)
            for t in [t for t in live if t not in self._path_types]:
                del live[t]
            self._complete.discard(acc)
        self._spawn(self.resync())

    async def resync(self) -> None:
        await self._read_incomplete()

    async def close(self) -> None:
        """Stop retrying and reading (the gateway is stopping)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        pending = [*self._tasks, *self._reads.values()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
