"""States, the change log and events of the embedded backend: RFC 8620 §5.2 /changes exactness, RFC 8621 §2
mailbox counts, one StateChangeEvent per account per call, persistence across a restart."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.bus.events import StateChangeEvent
from tests.unit.test_backend_support import ALICE, BOB, CAROL, Client, Env, backend_env, deliver, message

TYPES = {"Mailbox", "Email", "Thread", "EmailDelivery", "VacationResponse"}





# --- /changes ---

async def test_changes_collapse_per_rfc8620(bob: Client, env: Env) -> None:
    start = await bob.state("Email")
    kept = await deliver(env, message("kept"))
    fleeting = await deliver(env, message("fleeting"))
    await bob.call("Email/set", {"update": {kept: {"keywords/$seen": True}}, "destroy": [fleeting]})
    got = await bob.call("Email/changes", {"sinceState": start})
    # Created then updated: just created. Created then destroyed: not mentioned at all.
    assert (got["created"], got["updated"], got["destroyed"]) == ([kept], [], [])
    assert got["oldState"] == start and got["newState"] == await bob.state("Email")
    assert got["hasMoreChanges"] is False

    middle = got["newState"]
    await bob.call("Email/set", {"update": {kept: {"keywords/$flagged": True}}})
    await bob.call("Email/set", {"destroy": [kept]})
    got = await bob.call("Email/changes", {"sinceState": middle})
    # Updated then destroyed: just destroyed.
    assert (got["created"], got["updated"], got["destroyed"]) == ([], [], [kept])
    same = await bob.call("Email/changes", {"sinceState": got["newState"]})
    assert (same["created"], same["updated"], same["destroyed"], same["newState"]) == ([], [], [], got["newState"])


async def test_max_changes_pages_through_intermediate_states(bob: Client, env: Env) -> None:
    start = await bob.state("Email")
    ids = [await deliver(env, message(f"m{i}")) for i in range(7)]
    seen: list[str] = []
    state, pages = start, []
    while True:
        got = await bob.call("Email/changes", {"sinceState": state, "maxChanges": 3})
        assert len(got["created"]) + len(got["updated"]) + len(got["destroyed"]) <= 3
        seen += got["created"]
        pages.append(got["hasMoreChanges"])
        state = got["newState"]
        if not got["hasMoreChanges"]:
            break
    assert pages == [True, True, False]
    assert seen == ids and state == await bob.state("Email")
    assert (await bob.error("Email/changes", {"sinceState": start, "maxChanges": 0}))["type"] == "invalidArguments"


async def test_cannot_calculate_changes(bob: Client, tmp_path: Any) -> None:
    current = await bob.state("Email")
    modseq, _, epoch = current.partition("-")
    for bad in ("garbage", f"{int(modseq) + 5}-{epoch}", f"{modseq}-other", ""):
        error = await bob.error("Email/changes", {"sinceState": bad})
        assert error["type"] == "cannotCalculateChanges", bad
    assert (await bob.error("Mailbox/changes", {}))["type"] == "invalidArguments"  # sinceState is required

    # A state older than the retained log cannot be answered either.
    async with backend_env(str(tmp_path / "small.sqlite3"), change_log_limit=4) as small:
        carol = small.client(CAROL)
        old = await carol.state("Email")
        await deliver(small, message("one"), to=CAROL)
        recent = await carol.state("Email")
        for i in range(3):
            await deliver(small, message(f"more {i}"), to=CAROL)
        assert (await carol.error("Email/changes", {"sinceState": old}))["type"] == "cannotCalculateChanges"
        got = await carol.call("Email/changes", {"sinceState": await carol.state("Email")})
        assert got["created"] == []
        assert recent != await carol.state("Email")


async def test_mailbox_changes_say_when_only_counts_changed(bob: Client, env: Env) -> None:
    inbox = await bob.mailbox("inbox")
    start = await bob.state("Mailbox")
    await deliver(env, message())
    got = await bob.call("Mailbox/changes", {"sinceState": start})
    assert got["updated"] == [inbox] and got["created"] == got["destroyed"] == []
    # RFC 8621 §2.2: only counts moved, and the server says so.
    assert got["updatedProperties"] == ["totalEmails", "unreadEmails", "totalThreads", "unreadThreads"]
    await bob.call("Mailbox/set", {"update": {inbox: {"sortOrder": 7}}})
    got = await bob.call("Mailbox/changes", {"sinceState": start})
    assert got["updated"] == [inbox] and got["updatedProperties"] is None
    made = await bob.call("Mailbox/set", {"create": {"n": {"name": "New"}}})
    got = await bob.call("Mailbox/changes", {"sinceState": made["oldState"]})
    assert got["created"] == [made["created"]["n"]["id"]] and got["updatedProperties"] is None


async def test_thread_changes(bob: Client, env: Env) -> None:
    start = await bob.state("Thread")
    root = await deliver(env, message("t", message_id="<t@example.com>"))
    thread = (await bob.email(root, "threadId"))["threadId"]
    after_root = await bob.state("Thread")
    reply = await deliver(env, message("Re: t", in_reply_to="<t@example.com>"))
    assert (await bob.call("Thread/changes", {"sinceState": start}))["created"] == [thread]
    got = await bob.call("Thread/changes", {"sinceState": after_root})
    assert got["updated"] == [thread] and got["created"] == []
    before_flag = await bob.state("Thread")
    await bob.call("Email/set", {"update": {root: {"keywords/$seen": True}}})
    assert await bob.state("Thread") == before_flag  # keywords are not part of a Thread
    await bob.call("Email/set", {"destroy": [root, reply]})
    assert (await bob.call("Thread/changes", {"sinceState": before_flag}))["destroyed"] == [thread]


# --- counts and /changes, checked against a replica under random operations ---

def _truth_counts(emails: dict[str, dict[str, Any]], mailbox_ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """RFC 8621 §2 counts computed the slow, obvious way."""
    def unread(e: dict[str, Any]) -> bool:
        return "$seen" not in e["keywords"] and "$draft" not in e["keywords"]

    threads: dict[str, list[dict[str, Any]]] = {}
    for e in emails.values():
        threads.setdefault(e["threadId"], []).append(e)
    out: dict[str, tuple[int, ...]] = {}
    for mb in mailbox_ids:
        inside = [e for e in emails.values() if mb in e["mailboxIds"]]
        thread_ids = {e["threadId"] for e in inside}
        out[mb] = (len(inside), sum(unread(e) for e in inside), len(thread_ids),
                   sum(any(unread(e) for e in threads[t]) for t in thread_ids))
    return out


class Replica:
    """A client cache kept in sync only through /changes + /get, as RFC 8620 §5.2 intends."""

    def __init__(self, client: Client, type_: str, props: list[str]) -> None:
        self.client, self.type, self.props = client, type_, props
        self.objects: dict[str, dict[str, Any]] = {}
        self.state = ""

    async def load(self) -> None:
        got = await self.client.call(f"{self.type}/get", {"ids": None, "properties": self.props})
        self.objects = {o["id"]: o for o in got["list"]}
        self.state = got["state"]

    async def sync(self, max_changes: int) -> None:
        while True:
            got = await self.client.call(f"{self.type}/changes",
                                         {"sinceState": self.state, "maxChanges": max_changes})
            # Exactness: created ids are new to us, updated and destroyed ones are known.
            assert not set(got["created"]) & self.objects.keys(), got
            assert set(got["updated"]) <= self.objects.keys(), got
            assert set(got["destroyed"]) <= self.objects.keys(), got
            for gone in got["destroyed"]:
                del self.objects[gone]
            fetch = got["created"] + got["updated"]
            if fetch:
                fresh = await self.client.call(f"{self.type}/get", {"ids": fetch, "properties": self.props})
                assert fresh["notFound"] == [] or got["hasMoreChanges"]
                for o in fresh["list"]:
                    self.objects[o["id"]] = o
            self.state = got["newState"]
            if not got["hasMoreChanges"]:
                return


async def test_counts_and_changes_stay_exact_under_random_operations(bob: Client, env: Env) -> None:
    rng = random.Random(8621)
    mail = Replica(bob, "Email", ["threadId", "mailboxIds", "keywords"])
    boxes = Replica(bob, "Mailbox", ["name", "totalEmails", "unreadEmails", "totalThreads", "unreadThreads"])
    threads = Replica(bob, "Thread", ["emailIds"])
    for replica in (mail, boxes, threads):
        await replica.load()
    message_ids: list[str] = []
    extra = (await bob.call("Mailbox/set", {"create": {"x": {"name": "X"}, "y": {"name": "Y"}}}))["created"]
    for step in range(120):
        emails = {e["id"]: e for e in (await bob.call("Email/get", {
            "ids": None, "properties": ["threadId", "mailboxIds", "keywords"]}))["list"]}
        mailbox_ids = list((await bob.mailboxes()).keys())
        op = rng.random()
        if op < 0.35 or not emails:
            parent = rng.choice(message_ids) if message_ids and rng.random() < 0.6 else None
            mid = f"<s{step}@example.com>"
            message_ids.append(mid)
            await deliver(env, message(f"step {step}", message_id=mid, in_reply_to=parent))
        elif op < 0.6:
            target = rng.choice(list(emails))
            keyword = rng.choice(["$seen", "$draft", "$flagged"])
            value: bool | None = rng.choice([True, None])
            await bob.call("Email/set", {"update": {target: {f"keywords/{keyword}": value}}})
        elif op < 0.8:
            target = rng.choice(list(emails))
            patch: dict[str, bool | None] = {f"mailboxIds/{rng.choice(mailbox_ids)}": True}
            current = list(emails[target]["mailboxIds"])
            if len(current) > 1:
                patch[f"mailboxIds/{rng.choice(current)}"] = None
            await bob.call("Email/set", {"update": {target: patch}})
        elif op < 0.93:
            await bob.call("Email/set", {"destroy": rng.sample(list(emails), k=min(2, len(emails)))})
        else:
            victim = extra.popitem()[1]["id"] if extra else None
            if victim:
                await bob.call("Mailbox/set", {"destroy": [victim], "onDestroyRemoveEmails": True})
            else:
                extra = (await bob.call("Mailbox/set", {"create": {"x": {"name": f"X{step}"}}}))["created"]
        await mail.sync(rng.randint(1, 4))
        await boxes.sync(rng.randint(1, 3))
        await threads.sync(rng.randint(1, 3))

        truth = {e["id"]: e for e in (await bob.call("Email/get", {
            "ids": None, "properties": ["threadId", "mailboxIds", "keywords"]}))["list"]}
        assert mail.objects == truth, step
        server_boxes = await bob.mailboxes()
        counts = _truth_counts(truth, list(server_boxes))
        for mb, box in server_boxes.items():
            assert (box["totalEmails"], box["unreadEmails"], box["totalThreads"], box["unreadThreads"]) == \
                counts[mb], (step, box["name"])
        assert {k: {p: v[p] for p in v if p != "id"} for k, v in boxes.objects.items()} == \
            {k: {p: v[p] for p in boxes.props} for k, v in server_boxes.items()}, step
        thread_truth: dict[str, set[str]] = {}
        for e in truth.values():
            thread_truth.setdefault(e["threadId"], set()).add(e["id"])
        assert {k: set(v["emailIds"]) for k, v in threads.objects.items()} == thread_truth, step


# --- events ---

async def test_one_event_per_account_per_call_and_delivery(env: Env) -> None:
    bob = env.client(BOB)
    await env.backend.deliver([BOB, ALICE], message())
    assert sorted(e.username for e in env.events) == [ALICE, BOB]
    for e in env.events:
        assert set(e.typeStates) == {"Email", "Thread", "Mailbox", "EmailDelivery"}
        owner = env.client(e.username)
        assert e.typeStates == {t: await owner.state(t) for t in e.typeStates}
    env.events.clear()

    ids = (await bob.call("Email/query", {}))["ids"]
    await bob.call("Mailbox/get")
    assert env.events == []  # reads publish nothing

    # Several emails in one Email/set: still one event, and no EmailDelivery.
    more = [await deliver(env, message(f"n{i}")) for i in range(3)]
    env.events.clear()
    await bob.call("Email/set", {"update": {i: {"keywords/$seen": True} for i in ids + more}})
    [event] = env.events
    assert event.username == BOB and set(event.typeStates) == {"Email", "Mailbox"}
    env.events.clear()
    await bob.call("Email/set", {"update": {ids[0]: {"keywords/$seen": True}}})  # already so: nothing moves
    assert env.events == []
    drafts = await bob.mailbox("drafts")
    await bob.call("Email/set", {"create": {"d": {"mailboxIds": {drafts: True}, "subject": "x"}}})
    [event] = env.events
    assert set(event.typeStates) == {"Email", "Mailbox", "Thread"}  # a draft is no delivery
    env.events.clear()
    await bob.call("Email/set", {"destroy": more})
    assert [set(e.typeStates) for e in env.events] == [{"Email", "Mailbox", "Thread"}]
    env.events.clear()
    # Two calls in one request: one event with the latest states.
    response = await bob.request([
        ("Email/set", {"accountId": bob.account_id, "update": {ids[0]: {"keywords/$flagged": True}}}, "a"),
        ("Email/set", {"accountId": bob.account_id, "update": {ids[0]: {"keywords/$answered": True}}}, "b"),
    ])
    [event] = env.events
    assert event.typeStates["Email"] == response.methodResponses[1][1]["newState"]
    assert not env.events_for(ALICE)


async def test_events_are_published_after_the_commit(env: Env) -> None:
    seen: list[tuple[StateChangeEvent, dict[str, str]]] = []

    async def check(events: Sequence[StateChangeEvent]) -> None:
        for event in events:
            client = env.client(event.username)
            states = await env.backend.current_states(client.principal, [client.account_id])
            seen.append((event, states[client.account_id]))

    env.on_publish = check
    await deliver(env, message())
    bob = env.client(BOB)
    await bob.call("Mailbox/set", {"create": {"n": {"name": "N"}}})
    assert len(seen) == 2
    for event, states in seen:
        # What the event announces is already readable when it is published.
        assert {t: states[t] for t in event.typeStates} == event.typeStates


async def test_states_move_only_for_what_changed(env: Env) -> None:
    bob = env.client(BOB)
    states = await env.backend.current_states(bob.principal, [bob.account_id])
    assert set(states[bob.account_id]) == TYPES
    await bob.call("VacationResponse/set", {"update": {"singleton": {"isEnabled": True}}})
    after = (await env.backend.current_states(bob.principal, [bob.account_id]))[bob.account_id]
    assert {t for t in TYPES if after[t] != states[bob.account_id][t]} == {"VacationResponse"}


async def test_concurrent_deliveries_are_group_committed(env: Env) -> None:
    bob = env.client(BOB)
    results = await asyncio.gather(*(env.backend.deliver([BOB], message(f"c{i}")) for i in range(40)))
    ids = [r[BOB] for r in results]
    assert len(set(ids)) == 40
    assert sorted((await bob.call("Email/query", {}))["ids"]) == sorted(ids)
    assert (await bob.mailboxes())[await bob.mailbox("inbox")]["totalEmails"] == 40
    # Batches share one event per account, and their states only ever grow.
    assert 1 <= len(env.events) <= 40
    modseqs = [int(e.typeStates["EmailDelivery"].partition("-")[0]) for e in env.events]
    assert modseqs == sorted(modseqs) and len(set(modseqs)) == len(modseqs)
    assert env.events[-1].typeStates["Email"] == await bob.state("Email")


async def test_a_cancelled_call_still_commits_and_publishes(tmp_path: Any) -> None:
    path = str(tmp_path / "mail.sqlite3")
    async with backend_env(path) as env:
        bob = env.client(BOB)
        task = asyncio.ensure_future(bob.call("Mailbox/set", {"create": {"n": {"name": "Orphan"}}}))
        await asyncio.sleep(0)  # one loop step: the call is queued on the store's thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # stop() waited for the job: its event went out and the mailbox is stored.
    assert [set(e.typeStates) for e in env.events] == [{"Mailbox"}]
    async with backend_env(path) as again:
        names = [m["name"] for m in (await again.client(BOB).mailboxes()).values()]
        assert "Orphan" in names


async def test_everything_survives_a_restart(tmp_path: Any) -> None:
    path = str(tmp_path / "mail.sqlite3")
    async with backend_env(path) as env:
        bob = env.client(BOB)
        start = await bob.state("Email")
        delivered = await deliver(env, message("durable"))
        drafts = await bob.mailbox("drafts")
        created = await bob.call("Email/set", {"create": {"d": {"mailboxIds": {drafts: True}, "subject": "draft"}}})
        draft = created["created"]["d"]["id"]
        states = await env.backend.current_states(bob.principal, [bob.account_id])
        mailboxes = await bob.mailboxes()
    async with backend_env(path) as env:
        bob = env.client(BOB)
        assert await env.backend.current_states(bob.principal, [bob.account_id]) == states
        got = await bob.call("Email/get", {"ids": [delivered, draft], "properties": ["subject"]})
        assert [e["subject"] for e in got["list"]] == ["durable", "draft"]
        assert await bob.mailboxes() == mailboxes
        # The change log survived too: a client resumes from a state it had before the restart.
        changes = await bob.call("Email/changes", {"sinceState": start})
        assert changes["created"] == [delivered, draft]
        blob = created["created"]["d"]["blobId"]
        raw = await env.backend.blob(bob.principal, bob.account_id, blob)
        assert raw is not None and b"Subject: draft" in raw


async def test_in_memory_database_and_missing_data_directory(tmp_path: Any) -> None:
    async with backend_env(":memory:") as env:
        await deliver(env, message("in memory"))
        assert len((await env.client(BOB).call("Email/query", {}))["ids"]) == 1
    nested = tmp_path / "not" / "yet" / "there" / "mail.sqlite3"
    async with backend_env(str(nested)) as env:
        await deliver(env, message("on disk"))
    assert nested.exists()
    # WAL mode, so readers never wait for the writer.
    with sqlite3.connect(nested) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
