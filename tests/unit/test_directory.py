"""The embedded directory (gateway.directory): James's accountIds, passwords, principals and delegation."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.directory import Account, Directory, Principal, account_id_for

USERS = [("bob@example.com", "bob"), ("alice@example.com", "alice"), ("carol@example.com", "cärol €")]
BOB, ALICE, CAROL = (u for u, _ in USERS)


def test_account_ids_are_james_s() -> None:
    # DESIGN.md §5: the lowercase hex SHA-256 of the username's UTF-8 bytes.
    assert account_id_for("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert account_id_for("bob@example.com") == "5ff860bf1190596c7188ab851db691f0f3169c453936e9e1eba2f9a47f7a0018"


@given(st.text(max_size=40))
def test_account_ids_are_64_lowercase_hex_and_differ_by_case(username: str) -> None:
    acc = account_id_for(username)
    assert acc == hashlib.sha256(username.encode()).hexdigest()
    assert len(acc) == 64 and acc == acc.lower()
    if username.upper() != username:
        assert account_id_for(username.upper()) != acc  # usernames are taken as they are, not case-folded


def test_passwords() -> None:
    d = Directory(USERS)
    assert d.check_password(BOB, "bob")
    assert d.check_password(CAROL, "cärol €")
    assert not d.check_password(BOB, "alice")
    assert not d.check_password(BOB, "")
    assert not d.check_password(BOB, "bob ")
    assert not d.check_password("nobody@example.com", "bob")
    assert not d.check_password("nobody@example.com", "\0" * 16)  # the stand-in compared for unknown users


def test_users() -> None:
    d = Directory(USERS)
    assert d.usernames() == [BOB, ALICE, CAROL]
    assert d.exists(BOB) and not d.exists("bob") and not d.exists("")
    assert Directory([]).usernames() == []


def test_own_account_first_then_delegated_ones_by_owner() -> None:
    d = Directory(USERS)
    assert d.accounts_for(BOB) == [Account(account_id_for(BOB), BOB, BOB, True)]
    assert d.grant(CAROL, BOB) and d.grant(ALICE, BOB)
    assert d.accounts_for(BOB) == [
        Account(account_id_for(BOB), BOB, BOB, True),
        Account(account_id_for(ALICE), ALICE, ALICE, False),
        Account(account_id_for(CAROL), CAROL, CAROL, False),
    ]
    assert [a.id for a in d.accounts_for(ALICE)] == [account_id_for(ALICE)]  # grants go one way


def test_a_grant_to_oneself_adds_nothing() -> None:
    d = Directory(USERS)
    d.grant(BOB, BOB)
    assert d.accounts_for(BOB) == [Account(account_id_for(BOB), BOB, BOB, True)]


def test_grant_and_revoke_report_changes_and_tell_listeners() -> None:
    d = Directory(USERS)
    heard: list[tuple[str, str, bool]] = []
    d.add_listener(lambda owner, delegate, granted: heard.append((owner, delegate, granted)))
    assert d.grant(ALICE, BOB) is True
    assert d.grant(ALICE, BOB) is False  # already granted: no change, nobody told
    assert d.revoke(ALICE, CAROL) is False
    assert d.revoke(ALICE, BOB) is True
    assert d.revoke(ALICE, BOB) is False
    assert heard == [(ALICE, BOB, True), (ALICE, BOB, False)]
    assert d.accounts_for(BOB) == [Account(account_id_for(BOB), BOB, BOB, True)]


def test_listeners_are_told_after_the_change() -> None:
    d = Directory(USERS)
    seen: list[list[str]] = []
    d.add_listener(lambda owner, delegate, granted: seen.append([a.owner for a in d.accounts_for(delegate)]))
    d.grant(ALICE, BOB)
    d.revoke(ALICE, BOB)
    assert seen == [[BOB, ALICE], [BOB]]


def test_principals() -> None:
    d = Directory(USERS)
    d.grant(ALICE, BOB)
    p = d.principal(BOB, expires_at=1234.5)
    assert p == Principal(BOB, d.accounts_for(BOB), 1234.5)
    assert p.account_ids == [account_id_for(BOB), account_id_for(ALICE)]
    assert p.may_use(account_id_for(ALICE)) and not p.may_use(account_id_for(CAROL))
    assert d.principal(CAROL).expires_at is None


@pytest.mark.parametrize("username", ["nobody@example.com", ""])
def test_a_principal_for_an_unknown_name_has_only_its_own_account(username: str) -> None:
    # The directory does not authenticate: callers check the password (or the JWT) first.
    assert Directory(USERS).principal(username).account_ids == [account_id_for(username)]


OPS = st.lists(st.tuples(st.booleans(), st.sampled_from([BOB, ALICE, CAROL]), st.sampled_from([BOB, ALICE, CAROL])),
               max_size=30)


@given(OPS)
def test_accounts_follow_the_grants(ops: list[tuple[bool, str, str]]) -> None:
    d = Directory(USERS)
    grants: set[tuple[str, str]] = set()
    for grant, owner, delegate in ops:
        changed = d.grant(owner, delegate) if grant else d.revoke(owner, delegate)
        before = set(grants)
        (grants.add if grant else grants.discard)((owner, delegate))
        assert changed == (grants != before)
    for user in (BOB, ALICE, CAROL):
        owners = sorted(o for o, dlg in grants if dlg == user and o != user)
        assert [a.owner for a in d.accounts_for(user)] == [user, *owners]
