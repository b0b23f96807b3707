"""A hypothesis state machine of push resume (RFC 8887 §4.3.5) over whole histories, against a real gateway
process (all-in-one role, memory bus, SQLite file that survives restarts, real SMTP), through real sockets.

The model. Three client devices (two of Bob's, one of Alice's) connect, enable push (with their last pushState,
without one, or with one the server cannot read; `dataTypes` null, absent, [] or any mix of the five mail types, a
custom type and an unknown name), disable and close; meanwhile mail is delivered over SMTP, flags are changed,
emails destroyed and vacation responses toggled over `POST /jmap/api`, a custom type is published through
`POST /admin/events`, Bob's account is shared with Alice and taken back, and the gateway is restarted (SIGTERM or
SIGKILL, with or without the devices reconnecting and resuming at once). A device keeps what a real client keeps:
the states it was told (merged from every StateChange, newest wins), its own `/get` sync after an enable without
pushState, and the last pushState it received.

The invariant, checked after every enable and after every event while a device is enabled: within a deadline
(reading the socket, never sleeping) the device's states equal the server's current states for every type it
asked for and every account it sees, where "the server's current state" is:
- Mailbox, Email, Thread, VacationResponse: what the JMAP API itself answers (`/get` with `ids: []`, RFC 8620
  §5.1), never the hub's opinion;
- EmailDelivery, which has no /get: the state must move exactly when deliveries happen. The model counts the
  deliveries per account; each count has one state value and each value one count (learned the first time a
  device is seen converged at that count, after a socket round trip has drained every push written before it;
  the memory bus writes pushes before SMTP answers 250). A device whose value belongs to an older count has
  missed a delivery; a value that comes back for a different count moved without one, or failed to move;
- the custom type, which only the bus carries: the node can know only what it saw while bound to the account
  (some session covering it push-enabled on that process since its start). If the last publish happened while
  bound, the device ends with exactly that value; always, any pushed custom value is one really published for
  that account.
For EmailDelivery and the custom type the device must also be "in step": its states are no resume cursor's, so
after an enable without pushState (the server pushes nothing, and the client cannot read these types) the
device is exempt until a push of that type reaches it or an unreadable pushState made the server send
everything.

Checked on every push as it arrives: it names only accounts the socket sees (RFC 8887 §4.3.5, DESIGN.md §4),
only types the subscription asked for, never arrives after a disable or on an enable without pushState, and a
resume with an unreadable pushState pushes every asked type the server knows.

`make test` runs a batch of about a minute; `RESUME_MODEL_MINUTES=20` runs batches for that long. The counts
(examples, steps, resumes, restarts, pushes) are printed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import pytest
from hypothesis import Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from gateway.directory import account_id_for
from tests.conftest import ALICE, BOB
from tests.model.harness import (
    ABSENT,
    READABLE,
    GatewayProcess,
    PushSocket,
    SocketClosed,
    admin_delegation,
    admin_publish,
    api,
    basic,
    email_ids,
    send_mail,
    server_states,
    state_calls,
)

ED = "EmailDelivery"
CUSTOM = "com.example.Note"  # a custom data type: only the bus carries it
UNKNOWN = "NoSuchType"  # ignored by the server (DESIGN.md §4)
ALL = (*READABLE, ED, CUSTOM)
UNREADABLE = (ED, CUSTOM)
BOB_ACC, ALICE_ACC = account_id_for(BOB[0]), account_id_for(ALICE[0])
OWNER = {BOB_ACC: BOB, ALICE_ACC: ALICE}
GARBAGE_TOKENS = ("not-a-push-state", "1@@@@", "1" + "A" * 7)
# Bob's first device carries most of the story; the others make the hub's bookkeeping per account matter.
DEVICE = st.sampled_from(["bob1", "bob1", "bob2", "alice"])
TYPES: st.SearchStrategy[Any] = st.one_of(st.just(None), st.just(ABSENT), st.just(frozenset()),
                  st.frozensets(st.sampled_from((*ALL, UNKNOWN)), min_size=1))

MINUTES = float(os.environ.get("RESUME_MODEL_MINUTES", "0") or 0)
# Every example starts a gateway process, so shrinking a failure takes many minutes: off unless asked for. The
# failing example is kept in hypothesis' database; `RESUME_MODEL_SHRINK=1` replays and shrinks it.
SHRINK = os.environ.get("RESUME_MODEL_SHRINK", "") not in ("", "0")
# One batch for `make test` (about a minute on the shared 2-core machine).
# No health check is suppressed: none fires (the gateway start in __init__ is no data generation).
BATCH = settings(max_examples=10, stateful_step_count=30, deadline=None,
                 phases=[p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)])


# The actions of the model, each with a weight and its arguments' strategies. They are drawn by one rule
# (`ResumeModel.step`) rather than being rules each: hypothesis picks among rules evenly, favours the first in its
# own order, and switches random subsets of rules off per example (swarm testing), which in a budget of ten
# examples left most histories without a resume after a missed change. The weights keep histories dense in
# resumes and changes, and restarts (about a second each) rare.
ACTIONS: dict[str, tuple[int, dict[str, st.SearchStrategy[Any]]]] = {}
Action = TypeVar("Action", bound=Callable[..., None])


def action(weight: int, **strategies: st.SearchStrategy[Any]) -> Callable[[Action], Action]:
    def register(fn: Action) -> Action:
        ACTIONS[fn.__name__] = (weight, strategies)
        return fn
    return register


def asked(types: frozenset[str] | None) -> set[str]:
    """The model types a subscription covers (null/absent = all; unknown names match nothing)."""
    return set(ALL) if types is None else set(types) & set(ALL)


class Device:
    """One client device: its socket (if any), its subscription, and what it knows."""

    def __init__(self, name: str, user: tuple[str, str]) -> None:
        self.name = name
        self.user = user
        self.socket: PushSocket | None = None
        self.enabled = False
        self.types: frozenset[str] | None = None  # the current subscription's dataTypes (None = all)
        self.known: dict[str, dict[str, str]] = {}  # accountId -> type -> state, as the device was told
        self.push_state: str | None = None
        self.in_step: set[tuple[str, str]] = set()  # (account, unreadable type) whose value can be trusted
        # What a push may carry right now (a subscription being replaced may still have pushes in flight).
        self.allowed_accounts: set[str] = set()
        self.allowed_types: set[str] | None = set()  # None = any type
        self.silent = False  # an enable without pushState is being processed: no push may arrive
        self.pushed: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"Device({self.name}, enabled={self.enabled}, types={self.types})"


class ResumeModel(RuleBasedStateMachine):
    examples: ClassVar[int] = 0
    steps: ClassVar[int] = 0
    resumes: ClassVar[int] = 0
    restarts: ClassVar[int] = 0
    pushes: ClassVar[int] = 0
    caught_up: ClassVar[int] = 0  # resumes that pushed something
    kinds: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        ResumeModel.examples += 1
        self.dir = Path(tempfile.mkdtemp(prefix="resume-model-"))
        self.gw = GatewayProcess(self.dir, "node", LOG_LEVEL="WARNING")
        self.gw.start()
        self.devices = {"bob1": Device("bob1", BOB), "bob2": Device("bob2", BOB), "alice": Device("alice", ALICE)}
        self.delegated = False
        self.deliveries = {BOB_ACC: 0, ALICE_ACC: 0}
        self.ed_of_count: dict[str, dict[int, str]] = {BOB_ACC: {}, ALICE_ACC: {}}
        self.count_of_ed: dict[str, dict[str, int]] = {BOB_ACC: {}, ALICE_ACC: {}}
        self.published: dict[str, list[str]] = {BOB_ACC: [], ALICE_ACC: []}
        self.last_publish_seen = {BOB_ACC: False, ALICE_ACC: False}
        self.seq = 0

    def teardown(self) -> None:
        for d in self.devices.values():
            self._drop_socket(d)
        self.gw.stop("term")
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- model helpers -----------------------------------------------------------------------------------

    def visible(self, d: Device) -> set[str]:
        if d.user == BOB:
            return {BOB_ACC}
        return {ALICE_ACC, BOB_ACC} if self.delegated else {ALICE_ACC}

    def bound(self, account: str) -> bool:
        """Some push-enabled session on the node covers `account`."""
        return any(d.enabled and d.socket is not None and account in self.visible(d) for d in self.devices.values())

    def _step(self, what: str) -> None:
        ResumeModel.steps += 1
        note(f"step {what}")
        ResumeModel.kinds[what.split()[0]] += 1

    def _fail(self, d: Device, why: str) -> None:
        raise AssertionError(f"{d.name}: {why}\nknown={d.known}\nmodel: deliveries={self.deliveries} "
                             f"published={self.published} seen-while-bound={self.last_publish_seen} "
                             f"delegated={self.delegated}\n--- gateway log ---\n{self.gw.log_tail(2000)}")

    def _on_push(self, d: Device, msg: dict[str, Any]) -> None:
        ResumeModel.pushes += 1
        note(f"{d.name} <- {msg['changed']}")
        if d.silent:
            self._fail(d, f"a push on an enable without pushState (RFC 8887 §4.3.5.2): {msg}")
        if d.allowed_types is not None and not d.allowed_types:
            self._fail(d, f"a push while push is disabled: {msg}")
        for acc, states in msg["changed"].items():
            if acc not in d.allowed_accounts:
                self._fail(d, f"a StateChange names account {acc}, which this socket cannot see: {msg}")
            for t, value in states.items():
                if d.allowed_types is not None and t not in d.allowed_types:
                    self._fail(d, f"type {t} pushed, not in dataTypes {sorted(d.allowed_types)}: {msg}")
                if t == CUSTOM and value not in self.published.get(acc, []):
                    self._fail(d, f"custom state {value!r} was never published for {acc}: {msg}")
                d.known.setdefault(acc, {})[t] = value
                d.pushed.add((acc, t))
                if t in UNREADABLE:
                    d.in_step.add((acc, t))
        if msg.get("pushState"):
            d.push_state = msg["pushState"]

    def _connect(self, d: Device) -> None:
        self._drop_socket(d)
        d.socket = PushSocket(self.gw.ws_url, basic(d.user), lambda msg: self._on_push(d, msg))
        d.enabled = False
        d.allowed_types = set()
        d.allowed_accounts = self.visible(d)

    def _drop_socket(self, d: Device) -> None:
        if d.socket is not None:
            with contextlib.suppress(Exception):  # a socket the server already dropped (restart)
                d.socket.close()
        d.socket = None
        d.enabled = False

    def _sync(self, d: Device, accounts: set[str]) -> None:
        """What a client does after an enable without pushState: read the states itself, over the socket."""
        assert d.socket is not None
        types = sorted(asked(d.types) & set(READABLE))
        for acc in sorted(accounts):
            if not types:
                continue
            answer = d.socket.request(state_calls(acc, types))
            for name, args, call_id in answer["methodResponses"]:
                assert name != "error", args
                d.known.setdefault(acc, {})[call_id] = args["state"]

    def _enable(self, d: Device, types: Any, mode: Literal["token", "none", "garbage"], garbage: str) -> None:
        if d.socket is None:
            self._connect(d)
        assert d.socket is not None
        token = {"token": d.push_state, "none": None, "garbage": garbage}[mode]
        if token is None:
            mode = "none"
        new_types = None if types is None or types is ABSENT else frozenset(types)
        before = d.allowed_types if d.enabled else set()
        d.allowed_types = None if new_types is None or before is None else set(before) | set(new_types)
        d.pushed = set()
        d.silent = mode == "none"
        note(f"{d.name} enable dataTypes={types if types is not ABSENT else 'absent'} mode={mode}")
        d.socket.enable(types, token)
        d.enabled, d.types = True, new_types
        d.socket.barrier()
        d.silent = False
        d.allowed_types = None if new_types is None else set(new_types)
        accounts = self.visible(d)
        covered = asked(new_types)
        if mode == "none":
            # RFC 8887 §4.3.5.2: nothing to resume from; the server sends nothing by itself, the client syncs.
            d.in_step -= {(acc, t) for acc in accounts for t in UNREADABLE if t in covered}
            self._sync(d, accounts)
        else:
            ResumeModel.resumes += 1
            if mode == "garbage":
                # The full current state of the types asked for, and only those: a device that asked for none
                # (or not for EmailDelivery) learns nothing about the others, and a later resume with an older
                # pushState rightly sends only what moved since that one.
                d.in_step |= {(acc, t) for acc in accounts for t in UNREADABLE if t in covered}
        self._converge(d)
        if mode == "token":
            event("resume pushed what was missed" if d.pushed else "resume: nothing was missed")
            ResumeModel.caught_up += bool(d.pushed)
        if mode == "garbage":
            # DESIGN.md §4: a token that cannot be read gets the full current state.
            want = {(acc, t) for acc in accounts for t in covered if t in READABLE or t == ED}
            if not want <= d.pushed:
                self._fail(d, f"an unreadable pushState got only {sorted(d.pushed)}, not all of {sorted(want)}")

    def _converge(self, d: Device) -> None:
        """The invariant of the module docstring, for one enabled device."""
        sock = d.socket
        assert sock is not None and d.enabled
        sock.barrier()
        accounts = sorted(self.visible(d))
        covered = asked(d.types)
        want: dict[tuple[str, str], str] = {}
        for acc in accounts:
            now = server_states(self.gw.base, OWNER[acc], acc)
            for t in covered & set(READABLE):
                want[(acc, t)] = now[t]
            if CUSTOM in covered and (acc, CUSTOM) in d.in_step and self.last_publish_seen[acc]:
                want[(acc, CUSTOM)] = self.published[acc][-1]

        def converged() -> bool:
            return all(d.known.get(acc, {}).get(t) == v for (acc, t), v in want.items())

        if not sock.pump(converged):
            missing = {k: (d.known.get(k[0], {}).get(k[1]), v) for k, v in want.items()
                       if d.known.get(k[0], {}).get(k[1]) != v}
            self._fail(d, f"did not converge to the server's states; (known, server) = {missing}")
        for acc in accounts:
            if ED in covered and (acc, ED) in d.in_step:
                self._check_delivery_state(d, acc)

    def _check_delivery_state(self, d: Device, acc: str) -> None:
        assert d.socket is not None
        count = self.deliveries[acc]
        values, counts = self.ed_of_count[acc], self.count_of_ed[acc]

        def current() -> bool:
            value = d.known.get(acc, {}).get(ED)
            return value is not None and counts.get(value, count) == count

        if not d.socket.pump(current):
            value = d.known.get(acc, {}).get(ED)
            after = None if value is None else counts.get(value)
            self._fail(d, f"EmailDelivery of {acc} is {value!r}, the state after {after} deliveries; "
                          f"{count} happened")
        value = d.known[acc][ED]
        if value not in counts:
            if count in values:
                self._fail(d, f"EmailDelivery of {acc} is {value!r} after {count} deliveries, "
                              f"but another device saw {values[count]!r} at that count")
            values[count], counts[value] = value, count

    def settle(self) -> None:
        for d in self.devices.values():
            if d.enabled and d.socket is not None:
                self._converge(d)

    # --- client rules ------------------------------------------------------------------------------------

    @initialize(types=TYPES)
    def first_device(self, types: Any) -> None:
        """Bob's first device starts push-enabled, so that histories reach resumes sooner."""
        self._step("bob1 starts")
        self._enable(self.devices["bob1"], types, "none", "")

    @action(1, name=DEVICE)
    def connect(self, name: str) -> None:
        self._step(f"connect {name}")
        self._connect(self.devices[name])

    @action(3, name=DEVICE, types=TYPES, mode=st.sampled_from(["token", "token", "none", "garbage"]),
          garbage=st.sampled_from(GARBAGE_TOKENS))
    def enable(self, name: str, types: Any, mode: Literal["token", "none", "garbage"], garbage: str) -> None:
        self._step(f"enable {name}")
        self._enable(self.devices[name], types, mode, garbage)

    @action(4, name=DEVICE)
    def resume(self, name: str) -> None:
        """What a client does after losing its socket: a new one, enabled with the last pushState it got."""
        self._step(f"resume {name}")
        d = self.devices[name]
        self._connect(d)
        self._enable(d, d.types, "token", "")

    @action(1, name=DEVICE)
    def disable(self, name: str) -> None:
        self._step(f"disable {name}")
        d = self.devices[name]
        if d.socket is None:
            return
        d.socket.disable()
        d.socket.barrier()  # pushes written before the disable was read may still arrive until here
        d.enabled = False
        d.allowed_types = set()

    @action(2, name=DEVICE)
    def close(self, name: str) -> None:
        self._step(f"close {name}")
        self._drop_socket(self.devices[name])

    # --- event rules ---------------------------------------------------------------------------------------

    @action(2, to=st.sampled_from([(BOB_ACC,), (ALICE_ACC,), (BOB_ACC, ALICE_ACC)]),
          sender=st.sampled_from(["carol@example.org", "Dave <dave@example.net>"]))
    def deliver(self, to: tuple[str, ...], sender: str) -> None:
        self.seq += 1
        self._step(f"deliver to {[OWNER[a][0] for a in to]}")
        send_mail(self.gw.smtp_port, [OWNER[a][0] for a in to], f"mail {self.seq}", sender)
        for acc in to:
            self.deliveries[acc] += 1
        self.settle()

    @action(2, acc=st.sampled_from([BOB_ACC, ALICE_ACC]), pick=st.integers(0, 20), flagged=st.booleans())
    def flag(self, acc: str, pick: int, flagged: bool) -> None:
        self._step(f"flag in {OWNER[acc][0]}")
        ids = email_ids(self.gw.base, OWNER[acc], acc)
        if not ids:
            return
        patch = {"keywords/$flagged": True if flagged else None}
        out = api(self.gw.base, OWNER[acc], [["Email/set", {"accountId": acc, "update": {ids[pick % len(ids)]: patch}},
                                              "s"]])
        assert not out["s"].get("notUpdated"), out
        self.settle()

    @action(1, acc=st.sampled_from([BOB_ACC, ALICE_ACC]), pick=st.integers(0, 20))
    def destroy(self, acc: str, pick: int) -> None:
        self._step(f"destroy in {OWNER[acc][0]}")
        ids = email_ids(self.gw.base, OWNER[acc], acc)
        if not ids:
            return
        out = api(self.gw.base, OWNER[acc], [["Email/set", {"accountId": acc, "destroy": [ids[pick % len(ids)]]},
                                              "s"]])
        assert not out["s"].get("notDestroyed"), out
        self.settle()

    @action(1, acc=st.sampled_from([BOB_ACC, ALICE_ACC]), enabled=st.booleans())
    def vacation(self, acc: str, enabled: bool) -> None:
        self._step(f"vacation {enabled} in {OWNER[acc][0]}")
        out = api(self.gw.base, OWNER[acc], [["VacationResponse/set",
                                              {"accountId": acc, "update": {"singleton": {"isEnabled": enabled}}},
                                              "v"]])
        assert not out["v"].get("notUpdated"), out
        self.settle()

    @action(3, acc=st.sampled_from([BOB_ACC, ALICE_ACC]))
    def publish(self, acc: str) -> None:
        self.seq += 1
        value = f"note-{self.seq}"
        self._step(f"publish {CUSTOM}={value} for {OWNER[acc][0]}")
        self.published[acc].append(value)  # before: the push may arrive while the call returns
        admin_publish(self.gw.base, OWNER[acc][0], {CUSTOM: value})
        self.last_publish_seen[acc] = self.bound(acc)
        self.settle()

    @action(1, grant=st.booleans())
    def delegation(self, grant: bool) -> None:
        self._step(f"{'grant' if grant else 'revoke'} Bob's account to Alice")
        alice = self.devices["alice"]
        if grant:
            alice.allowed_accounts.add(BOB_ACC)  # pushes for it may come as soon as the grant is made
        status = admin_delegation(self.gw.base, BOB[0], ALICE[0], grant)
        assert status in ((201, 204) if grant else (204, 404)), status
        was = self.delegated
        self.delegated = grant
        if alice.socket is None:
            return
        # The open socket's subscription follows the new account list; a newly shared account is no resume: the
        # client syncs it as after an enable without pushState.
        alice.socket.barrier()
        alice.allowed_accounts = self.visible(alice)
        if alice.enabled and grant and not was:
            alice.in_step -= {(BOB_ACC, t) for t in UNREADABLE}
            self._sync(alice, {BOB_ACC})
        if alice.enabled:
            self._converge(alice)

    @action(1, how=st.sampled_from(["term", "kill"]), reconnect=st.booleans())
    def restart(self, how: Literal["term", "kill"], reconnect: bool) -> None:
        self._step(f"restart ({how}, reconnect={reconnect})")
        ResumeModel.restarts += 1
        resuming = [(d, d.types) for d in self.devices.values() if d.enabled and d.socket is not None]
        for d in self.devices.values():
            self._drop_socket(d)
        status = self.gw.stop(how)
        if how == "term":
            assert status == 0, f"SIGTERM exit status {status}\n{self.gw.log_tail()}"
        self.gw.start()
        # The node starts knowing nothing of custom types; delegations are kept in the database (they survive).
        self.last_publish_seen = {acc: False for acc in self.last_publish_seen}
        if reconnect:
            for d, types in resuming:
                self._enable(d, types, "token", "")


# Deliveries first: the choice hypothesis starts from and shrinks towards.
_ORDER = ("deliver", "resume", "enable", "publish", "flag", "close", "connect", "disable", "destroy", "vacation",
          "delegation", "restart")
assert set(_ORDER) == set(ACTIONS)
ACTION = st.sampled_from([name for name in _ORDER for _ in range(ACTIONS[name][0])])


@rule(data=st.data())
def _step_rule(self: ResumeModel, data: st.DataObject) -> None:
    name = data.draw(ACTION, label="action")
    kwargs = {k: data.draw(strategy, label=k) for k, strategy in ACTIONS[name][1].items()}
    getattr(self, name)(**kwargs)


ResumeModel.step = _step_rule


def _run(batch: settings) -> None:
    try:
        run_state_machine_as_test(ResumeModel, settings=batch)
    except SocketClosed as exc:  # a socket closing under a rule is a finding too: say which
        raise AssertionError(f"a socket closed unexpectedly: {exc}") from exc


@pytest.mark.timeout(int(MINUTES * 60) + 600 if MINUTES else 400)
def test_resume_model(capsys: pytest.CaptureFixture[str], record_property: Any) -> None:
    started = time.monotonic()
    batches = 0
    while True:
        batches += 1
        _run(BATCH)
        if time.monotonic() - started >= MINUTES * 60:
            break
    m = ResumeModel
    summary = (f"resume model: {m.examples} examples, {m.steps} steps, {m.resumes} resumes ({m.caught_up} pushed "
               f"what was missed), {m.restarts} restarts, {m.pushes} pushes in {batches} batches, "
               f"{time.monotonic() - started:.0f} s")
    for key in ("examples", "steps", "resumes", "caught_up", "restarts", "pushes"):
        record_property(key, getattr(ResumeModel, key))
    with capsys.disabled():
        print("\n" + summary + "\nsteps by rule: " + ", ".join(f"{k} {n}" for k, n in m.kinds.most_common()))
