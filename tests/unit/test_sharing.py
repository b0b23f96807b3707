"""Delegations of the all-in-one role (gateway.sharing) on the embedded backend's real SQLite database: durable
before the answer, loaded by every backend that starts on the file (a restarted worker), re-read when another
worker announces a change, and announced after the commit."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.directory import Directory, account_id_for
from gateway.sharing import Sharing
from tests.unit.test_backend_support import ALICE, BOB, CAROL, backend_env


def owners(directory: Directory, username: str) -> list[str]:
    return [a.owner for a in directory.accounts_for(username) if not a.is_personal]


async def test_a_grant_is_stored_and_every_later_start_knows_it(tmp_path: Path) -> None:
    db = str(tmp_path / "mail.sqlite3")
    async with backend_env(db) as first:
        sharing = Sharing(first.directory, first.backend)
        assert await sharing.grant(ALICE, BOB) is True
        assert await sharing.grant(CAROL, BOB) is True
        assert await sharing.grant(ALICE, BOB) is False  # already granted
        assert owners(first.directory, BOB) == [ALICE, CAROL]
    async with backend_env(db) as restarted:  # a new process on the same database
        assert owners(restarted.directory, BOB) == [ALICE, CAROL]
        assert restarted.directory.principal(BOB).may_use(account_id_for(ALICE))
        sharing = Sharing(restarted.directory, restarted.backend)
        assert await sharing.revoke(ALICE, BOB) is True
        assert await sharing.revoke(ALICE, BOB) is False  # nothing left to take back
    async with backend_env(db) as again:
        assert owners(again.directory, BOB) == [CAROL]


async def test_another_worker_s_change_is_read_from_the_database(tmp_path: Path) -> None:
    db = str(tmp_path / "mail.sqlite3")
    async with backend_env(db) as a, backend_env(db) as b:  # two workers, both running
        here, there = Sharing(a.directory, a.backend), Sharing(b.directory, b.backend)
        refreshed: list[tuple[str, str, bool]] = []
        b.directory.add_listener(lambda owner, delegate, granted: refreshed.append((owner, delegate, granted)))
        await here.grant(ALICE, BOB)
        assert owners(b.directory, BOB) == []  # not told yet
        await there.changed_elsewhere(ALICE, BOB, True)
        assert owners(b.directory, BOB) == [ALICE]
        assert refreshed == [(ALICE, BOB, True)]  # the listener that refreshes Bob's sockets ran
        # Announcements of one grant may arrive out of order: the database, not the message, decides.
        await here.revoke(ALICE, BOB)
        await there.changed_elsewhere(ALICE, BOB, True)  # a late copy of the grant's announcement
        assert owners(b.directory, BOB) == []
        assert refreshed == [(ALICE, BOB, True), (ALICE, BOB, False)]


async def test_announced_after_the_commit_even_when_nothing_changed(tmp_path: Path) -> None:
    async with backend_env(str(tmp_path / "mail.sqlite3")) as env:
        sharing = Sharing(env.directory, env.backend)
        heard: list[tuple[str, str, bool, bool]] = []

        async def announce(owner: str, delegate: str, granted: bool) -> None:
            heard.append((owner, delegate, granted, await env.backend.has_grant(owner, delegate)))

        sharing.announce = announce
        await sharing.grant(ALICE, BOB)
        await sharing.grant(ALICE, BOB)  # a repeated PUT repairs a worker that missed the first announcement
        await sharing.revoke(ALICE, BOB)
        assert heard == [(ALICE, BOB, True, True), (ALICE, BOB, True, True), (ALICE, BOB, False, False)]


async def test_a_failed_announcement_does_not_undo_a_committed_grant(tmp_path: Path) -> None:
    async with backend_env(str(tmp_path / "mail.sqlite3")) as env:
        sharing = Sharing(env.directory, env.backend)

        async def announce(owner: str, delegate: str, granted: bool) -> None:
            raise ConnectionError("the supervisor is gone")

        sharing.announce = announce
        assert await sharing.grant(ALICE, BOB) is True
        assert owners(env.directory, BOB) == [ALICE] and await env.backend.has_grant(ALICE, BOB)


async def test_a_grant_that_cannot_be_stored_is_not_applied(tmp_path: Path) -> None:
    async with backend_env(str(tmp_path / "mail.sqlite3")) as env:
        sharing = Sharing(env.directory, env.backend)
        await sharing.grant(CAROL, BOB)
        await env.backend.stop()  # the store is closed: the write fails
        with pytest.raises(RuntimeError):
            await sharing.grant(ALICE, BOB)
        with pytest.raises(RuntimeError):
            await sharing.revoke(CAROL, BOB)
        assert owners(env.directory, BOB) == [CAROL]  # as before both calls
        await env.backend.start()


async def test_without_a_store_the_directory_alone_keeps_them() -> None:
    directory = Directory([(BOB, "pw"), (ALICE, "pw")])
    sharing = Sharing(directory, None)
    assert await sharing.grant(ALICE, BOB) is True
    assert await sharing.grant(ALICE, BOB) is False
    assert owners(directory, BOB) == [ALICE]
    await sharing.changed_elsewhere(ALICE, BOB, False)  # nothing to read: the message says it
    assert owners(directory, BOB) == []
