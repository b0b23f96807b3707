"""The embedded backend's SQLite store: schema, accounts, per-type states, the change log, and the writes that
keep mailbox counts and the log exact.

Synchronous, and confined to the one worker thread that owns the connection (`service.py` runs it); nothing
here knows JMAP arguments or the event loop. States: each account has one modification counter (modseq);
every logged change of an object takes the next value, and a type's state is the modseq of its latest change,
written `<modseq>-<epoch>` where the epoch names this database (another database's state is unknown, not
misread).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.backend.mime.parse import ParsedEmail, address_sort_key, base_subject, search_fields

TYPES = ("Mailbox", "Email", "Thread", "EmailDelivery", "VacationResponse")
CREATED, UPDATED, DESTROYED = 0, 1, 2

# RFC 8621 §2: the mailboxes every account starts with, with their roles (RFC 8457) and sort orders.
DEFAULT_MAILBOXES = (("Inbox", "inbox", 1), ("Drafts", "drafts", 2), ("Sent", "sent", 3),
                     ("Trash", "trash", 4))

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts(
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    modseq INTEGER NOT NULL DEFAULT 0,   -- the last modseq handed out in this account
    pruned INTEGER NOT NULL DEFAULT 0    -- change-log rows at or below this modseq are gone
);
CREATE TABLE IF NOT EXISTS type_states(
    account_id TEXT NOT NULL, type TEXT NOT NULL, modseq INTEGER NOT NULL,
    PRIMARY KEY(account_id, type)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes(
    account_id TEXT NOT NULL, modseq INTEGER NOT NULL, type TEXT NOT NULL, object_id TEXT NOT NULL,
    kind INTEGER NOT NULL, counts_only INTEGER NOT NULL,
    PRIMARY KEY(account_id, modseq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS changes_by_type ON changes(account_id, type, modseq);
CREATE TABLE IF NOT EXISTS mailboxes(
    account_id TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL, parent_id TEXT, role TEXT,
    sort_order INTEGER NOT NULL DEFAULT 0, is_subscribed INTEGER NOT NULL DEFAULT 1,
    total_emails INTEGER NOT NULL DEFAULT 0, unread_emails INTEGER NOT NULL DEFAULT 0,
    total_threads INTEGER NOT NULL DEFAULT 0, unread_threads INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(account_id, id));
CREATE TABLE IF NOT EXISTS blobs(id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS emails(
    account_id TEXT NOT NULL, id TEXT NOT NULL, blob_id TEXT NOT NULL, thread_id TEXT NOT NULL,
    received_at INTEGER NOT NULL, size INTEGER NOT NULL,
    keywords TEXT NOT NULL,              -- JSON object keyword -> true (json_each in filters)
    unread INTEGER NOT NULL,             -- neither $seen nor $draft (RFC 8621 §2 unreadEmails)
    has_attachment INTEGER NOT NULL, sent_at INTEGER,
    subject_sort TEXT NOT NULL, from_sort TEXT NOT NULL, to_sort TEXT NOT NULL,
    s_subject TEXT NOT NULL, s_from TEXT NOT NULL, s_to TEXT NOT NULL, s_cc TEXT NOT NULL,
    s_bcc TEXT NOT NULL, s_body TEXT NOT NULL,
    meta TEXT NOT NULL,                  -- JSON of the immutable Email properties (mime.parse.ParsedEmail)
    PRIMARY KEY(account_id, id));
CREATE INDEX IF NOT EXISTS emails_by_thread ON emails(account_id, thread_id);
CREATE INDEX IF NOT EXISTS emails_by_received ON emails(account_id, received_at);
CREATE INDEX IF NOT EXISTS emails_by_blob ON emails(blob_id);
CREATE TABLE IF NOT EXISTS email_mailboxes(
    account_id TEXT NOT NULL, mailbox_id TEXT NOT NULL, email_id TEXT NOT NULL,
    PRIMARY KEY(account_id, mailbox_id, email_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS email_mailboxes_by_email ON email_mailboxes(account_id, email_id);
CREATE TABLE IF NOT EXISTS thread_refs(
    account_id TEXT NOT NULL, message_id TEXT NOT NULL, thread_id TEXT NOT NULL,
    PRIMARY KEY(account_id, message_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS thread_refs_by_thread ON thread_refs(account_id, thread_id);
CREATE TABLE IF NOT EXISTS vacation(account_id TEXT PRIMARY KEY, data BLOB NOT NULL);
-- /admin/delegations (RFC 9670 sharing): owner lets delegate use their account; shared by a group's workers.
CREATE TABLE IF NOT EXISTS delegations(
    owner TEXT NOT NULL, delegate TEXT NOT NULL, PRIMARY KEY(owner, delegate)) WITHOUT ROWID;
"""

_json = msgspec.json.Encoder()
_dejson = msgspec.json.Decoder()


def new_id(prefix: str) -> str:
    """A fresh object id: a letter and 20 hex digits (RFC 8620 §1.2 recommends a letter first)."""
    return prefix + secrets.token_hex(10)


def keyword_json(keywords: Iterable[str]) -> str:
    return _json.encode({k: True for k in sorted(keywords)}).decode()


def is_unread(keywords: Iterable[str]) -> bool:
    ks = set(keywords)
    return "$seen" not in ks and "$draft" not in ks


@dataclass(slots=True)
class MailboxRow:
    id: str
    name: str
    parent_id: str | None
    role: str | None
    sort_order: int
    is_subscribed: bool
    total_emails: int
    unread_emails: int
    total_threads: int
    unread_threads: int


@dataclass(slots=True)
class EmailRow:
    id: str
    blob_id: str
    thread_id: str
    received_at: int
    size: int
    keywords: list[str]
    meta: dict[str, Any]
    mailbox_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ChangeRows:
    """One /changes window: the ids to report and the state the client reaches."""

    created: list[str]
    updated: list[str]
    destroyed: list[str]
    new_modseq: int
    has_more: bool
    counts_only: bool  # every reported update changed only counts (RFC 8621 §2.2 updatedProperties)


class Store:
    """The SQLite database of every account; call only from the worker thread that opened it."""

    def __init__(self, path: str, *, change_log_limit: int = 10_000) -> None:
        self.path = path
        self.change_log_limit = change_log_limit
        self._db: sqlite3.Connection | None = None
        self.epoch = ""
        self._known_accounts: set[str] = set()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the store is not open")
        return self._db

    def open(self) -> None:
        if self.path != ":memory:" and not self.path.startswith("file:"):
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) around each write.
        db = sqlite3.connect(self.path, isolation_level=None, uri=self.path.startswith("file:"))
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we answer SMTP 250 or a /set response (durability over throughput;
        # deliveries are group-committed to amortise the sync).
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=OFF")
        # Unicode case folding for filters (SQLite's lower() only folds ASCII).
        db.create_function("jmap_fold", 1, _fold, deterministic=True)
        db.executescript(SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row is None:
            self.epoch = secrets.token_hex(3)
            db.execute("INSERT INTO meta(key, value) VALUES('epoch', ?)", (self.epoch,))
        else:
            self.epoch = row[0]
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- delegations ------------------------------------------------------------------------------------
    # Each write is one statement in autocommit mode: its own transaction, on disk when it returns.

    def grants(self) -> list[tuple[str, str]]:
        """Every (owner, delegate) grant."""
        return [(o, d) for o, d in self.db.execute("SELECT owner, delegate FROM delegations ORDER BY owner, delegate")]

    def set_grant(self, owner: str, delegate: str, granted: bool) -> bool:
        """Record or remove one grant; True when the database changed."""
        if granted:
            cur = self.db.execute("INSERT OR IGNORE INTO delegations(owner, delegate) VALUES(?, ?)", (owner, delegate))
        else:
            cur = self.db.execute("DELETE FROM delegations WHERE owner=? AND delegate=?", (owner, delegate))
        return cur.rowcount > 0

    def has_grant(self, owner: str, delegate: str) -> bool:
        return self.db.execute("SELECT 1 FROM delegations WHERE owner=? AND delegate=?",
                               (owner, delegate)).fetchone() is not None

    # --- accounts and states ------------------------------------------------------------------------------

    def ensure_account(self, account_id: str, username: str) -> None:
        """Create the account with its default mailboxes on first use (not logged: nobody has a state yet)."""
        if account_id in self._known_accounts:
            return
        db = self.db
        if db.in_transaction:
            # Its own commit must not end someone else's transaction: call it before opening one.
            raise RuntimeError("ensure_account inside a transaction")
        if db.execute("SELECT 1 FROM accounts WHERE id=?", (account_id,)).fetchone() is None:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Checked again under the write lock: another process (a worker) may have created it meanwhile.
                if db.execute("SELECT 1 FROM accounts WHERE id=?", (account_id,)).fetchone() is not None:
                    db.execute("ROLLBACK")
                    self._known_accounts.add(account_id)
                    return
                db.execute("INSERT INTO accounts(id, username) VALUES(?, ?)", (account_id, username))
                db.executemany("INSERT INTO type_states(account_id, type, modseq) VALUES(?, ?, 0)",
                               [(account_id, t) for t in TYPES])
                db.executemany(
                    "INSERT INTO mailboxes(account_id, id, name, role, sort_order) VALUES(?, ?, ?, ?, ?)",
                    [(account_id, new_id("B"), name, role, order) for name, role, order in DEFAULT_MAILBOXES])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        self._known_accounts.add(account_id)

    def username_of(self, account_id: str) -> str:
        row = self.db.execute("SELECT username FROM accounts WHERE id=?", (account_id,)).fetchone()
        if row is None:
            raise KeyError(account_id)
        return str(row[0])

    def format_state(self, modseq: int) -> str:
        return f"{modseq}-{self.epoch}"

    def states(self, account_id: str) -> dict[str, str]:
        rows = self.db.execute("SELECT type, modseq FROM type_states WHERE account_id=?", (account_id,))
        return {t: self.format_state(m) for t, m in rows}

    def state(self, account_id: str, type_: str) -> str:
        return self.format_state(self.type_modseq(account_id, type_))

    def type_modseq(self, account_id: str, type_: str) -> int:
        row = self.db.execute("SELECT modseq FROM type_states WHERE account_id=? AND type=?",
                              (account_id, type_)).fetchone()
        return int(row[0]) if row else 0

    def since_modseq(self, account_id: str, type_: str, state: str) -> int | None:
        """The modseq a client state stands for, or None when changes since it cannot be calculated:
        not one of our states, from another database, newer than the type's state, or older than the log."""
        number, sep, epoch = state.partition("-")
        if not sep or epoch != self.epoch or not number.isdigit():
            return None
        modseq = int(number)
        row = self.db.execute("SELECT pruned FROM accounts WHERE id=?", (account_id,)).fetchone()
        if row is None or modseq < row[0] or modseq > self.type_modseq(account_id, type_):
            return None
        return modseq

    def changes_since(self, account_id: str, type_: str, since: int, max_changes: int | None) -> ChangeRows:
        """RFC 8620 §5.2: collapse the log after `since` into created/updated/destroyed, at most `max_changes`
        distinct ids; when cut short, the new state is the modseq of the last row taken (a valid state)."""
        created: dict[str, None] = {}
        updated: dict[str, None] = {}
        destroyed: dict[str, None] = {}
        full_updates: set[str] = set()
        seen: set[str] = set()
        new_modseq = since
        has_more = False
        rows = self.db.execute(
            "SELECT modseq, object_id, kind, counts_only FROM changes "
            "WHERE account_id=? AND type=? AND modseq>? ORDER BY modseq", (account_id, type_, since))
        for modseq, oid, kind, counts_only in rows:
            if oid not in seen:
                if max_changes is not None and len(seen) >= max_changes:
                    has_more = True
                    break
                seen.add(oid)
            new_modseq = modseq
            if kind == CREATED:
                created[oid] = None
            elif kind == UPDATED:
                if oid not in created:
                    updated[oid] = None
                    if not counts_only:
                        full_updates.add(oid)
            elif oid in created:
                # Created and destroyed within the window: the client never needs to hear of it.
                del created[oid]
            else:
                updated.pop(oid, None)
                destroyed[oid] = None
        if not has_more:
            new_modseq = self.type_modseq(account_id, type_)
        return ChangeRows(list(created), list(updated), list(destroyed), new_modseq, has_more,
                          bool(updated) and not (full_updates & updated.keys()))

    # --- reads --------------------------------------------------------------------------------------------

    def mailboxes(self, account_id: str) -> list[MailboxRow]:
        rows = self.db.execute(
            "SELECT id, name, parent_id, role, sort_order, is_subscribed, total_emails, unread_emails, "
            "total_threads, unread_threads FROM mailboxes WHERE account_id=? ORDER BY sort_order, name",
            (account_id,))
        return [MailboxRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9]) for r in rows]

    def mailbox_ids(self, account_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM mailboxes WHERE account_id=?", (account_id,))}

    def mailbox_by_role(self, account_id: str, role: str) -> str | None:
        row = self.db.execute("SELECT id FROM mailboxes WHERE account_id=? AND role=?",
                              (account_id, role)).fetchone()
        return str(row[0]) if row else None

    def emails(self, account_id: str, ids: Sequence[str], *, with_meta: bool = True) -> dict[str, EmailRow]:
        out: dict[str, EmailRow] = {}
        cols = "id, blob_id, thread_id, received_at, size, keywords" + (", meta" if with_meta else "")
        for chunk in _chunks(list(dict.fromkeys(ids)), 500):
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(f"SELECT {cols} FROM emails WHERE account_id=? AND id IN ({marks})",
                                     (account_id, *chunk)):
                out[r[0]] = EmailRow(r[0], r[1], r[2], r[3], r[4], list(_dejson.decode(r[5])),
                                     _dejson.decode(r[6]) if with_meta else {})
            for email_id, mailbox_id in self.db.execute(
                    "SELECT email_id, mailbox_id FROM email_mailboxes "
                    f"WHERE account_id=? AND email_id IN ({marks})",
                    (account_id, *chunk)):
                out[email_id].mailbox_ids.append(mailbox_id)
        return out

    def all_email_ids(self, account_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT id FROM emails WHERE account_id=? ORDER BY received_at, rowid", (account_id,))]

    def count_emails(self, account_id: str) -> int:
        row = self.db.execute("SELECT count(*) FROM emails WHERE account_id=?", (account_id,)).fetchone()
        return int(row[0])

    def thread_email_ids(self, account_id: str, thread_ids: Sequence[str]) -> dict[str, list[str]]:
        """RFC 8621 §3: a thread's emailIds, oldest receivedAt first (ties in arrival order, stable)."""
        out: dict[str, list[str]] = {}
        for chunk in _chunks(list(dict.fromkeys(thread_ids)), 500):
            marks = ",".join("?" * len(chunk))
            for tid, eid in self.db.execute(
                    f"SELECT thread_id, id FROM emails WHERE account_id=? AND thread_id IN ({marks}) "
                    "ORDER BY received_at, rowid", (account_id, *chunk)):
                out.setdefault(tid, []).append(eid)
        return out

    def all_thread_ids(self, account_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT thread_id FROM emails WHERE account_id=? GROUP BY thread_id ORDER BY min(rowid)",
            (account_id,))]

    def blob(self, blob_id: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM blobs WHERE id=?", (blob_id,)).fetchone()
        return bytes(row[0]) if row else None

    def account_has_blob(self, account_id: str, blob_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM emails WHERE blob_id=? AND account_id=? LIMIT 1",
                               (blob_id, account_id)).fetchone() is not None

    def vacation(self, account_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM vacation WHERE account_id=?", (account_id,)).fetchone()
        return dict(_dejson.decode(row[0])) if row else None

    def query_email_ids(self, account_id: str, where: str, params: Sequence[Any], order: str
                        ) -> list[tuple[str, str]]:
        """(id, threadId) of the matching emails in order; `where`/`order` come from the query module."""
        sql = f"SELECT e.id, e.thread_id FROM emails e WHERE e.account_id=? AND ({where}) ORDER BY {order}"
        return [(r[0], r[1]) for r in self.db.execute(sql, (account_id, *params))]

    # --- writes -------------------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One atomic write: BEGIN IMMEDIATE ... COMMIT; on any error everything is rolled back."""
        tx = Transaction(self)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield tx
            tx.finish()
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back by itself (e.g. on SQLITE_FULL).
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise


def _fold(value: str | None) -> str | None:
    return value.casefold() if isinstance(value, str) else value


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass(slots=True)
class _Change:
    kind: int
    counts_only: bool


# A thread's contribution to mailbox counts: whether it has an unread email, and per mailbox
# (emails of the thread in it, unread emails of the thread in it).
_ThreadSig = tuple[bool, dict[str, tuple[int, int]]]


class Transaction:
    """The writes of one transaction, per account, and the new states they produced once committed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._accounts: dict[str, AccountWriter] = {}
        self.new_states: dict[str, dict[str, str]] = {}  # accountId -> changed type -> new state

    def account(self, account_id: str) -> AccountWriter:
        writer = self._accounts.get(account_id)
        if writer is None:
            writer = self._accounts[account_id] = AccountWriter(self.store, account_id)
        return writer

    def finish(self) -> None:
        for account_id, writer in self._accounts.items():
            states = writer.finish()
            if states:
                self.new_states[account_id] = states


class AccountWriter:
    """Writes to one account inside a transaction, logging each object change once (merged) and keeping
    the mailbox counts exact by diffing the touched threads before and after."""

    def __init__(self, store: Store, account_id: str) -> None:
        self.store = store
        self.db = store.db
        self.account_id = account_id
        self._changes: dict[tuple[str, str], _Change] = {}
        self._bumps: set[str] = set()
        self._threads_before: dict[str, _ThreadSig] = {}

    # --- change log ---

    def log(self, type_: str, object_id: str, kind: int, counts_only: bool = False) -> None:
        key = (type_, object_id)
        prev = self._changes.get(key)
        if prev is None:
            self._changes[key] = _Change(kind, counts_only)
        elif kind == DESTROYED:
            if prev.kind == CREATED:
                del self._changes[key]  # never visible outside this transaction
            else:
                prev.kind, prev.counts_only = DESTROYED, False
        elif kind == UPDATED and prev.kind == UPDATED:
            prev.counts_only = prev.counts_only and counts_only

    def bump(self, type_: str) -> None:
        """Move a type's state without an object change (EmailDelivery, VacationResponse)."""
        self._bumps.add(type_)

    def _thread_sig(self, thread_id: str) -> _ThreadSig:
        # CROSS JOIN fixes the join order (SQLite honours it): from the thread's few emails to their
        # mailboxes, never a walk over all of the account's mailbox memberships.
        per_mailbox = {mb: (total, unread) for mb, total, unread in self.db.execute(
            "SELECT em.mailbox_id, count(*), sum(e.unread) FROM emails e CROSS JOIN email_mailboxes em "
            "ON em.account_id=e.account_id AND em.email_id=e.id "
            "WHERE e.account_id=? AND e.thread_id=? GROUP BY em.mailbox_id", (self.account_id, thread_id))}
        unread = self.db.execute("SELECT EXISTS(SELECT 1 FROM emails WHERE account_id=? AND thread_id=? "
                                 "AND unread=1)", (self.account_id, thread_id)).fetchone()[0]
        return bool(unread), per_mailbox

    def touch_thread(self, thread_id: str) -> None:
        """Call before changing any email of the thread: remembers its count contribution once."""
        if thread_id not in self._threads_before:
            self._threads_before[thread_id] = self._thread_sig(thread_id)

    def _apply_count_deltas(self) -> None:
        # RFC 8621 §2: totalThreads/unreadThreads count threads with an email in the mailbox; unreadThreads
        # those that also have an unread email anywhere. Only the touched threads can have moved any count.
        deltas: dict[str, list[int]] = {}
        for thread_id, before in self._threads_before.items():
            after = self._thread_sig(thread_id)
            for (thread_unread, per_mailbox), sign in ((before, -1), (after, 1)):
                for mailbox_id, (total, unread) in per_mailbox.items():
                    d = deltas.setdefault(mailbox_id, [0, 0, 0, 0])
                    d[0] += sign * total
                    d[1] += sign * unread
                    d[2] += sign
                    d[3] += sign * thread_unread
        for mailbox_id, d in deltas.items():
            if any(d):
                cur = self.db.execute(
                    "UPDATE mailboxes SET total_emails=total_emails+?, unread_emails=unread_emails+?, "
                    "total_threads=total_threads+?, unread_threads=unread_threads+? "
                    "WHERE account_id=? AND id=?", (*d, self.account_id, mailbox_id))
                if cur.rowcount:
                    # RFC 8621 §2.2: a count change is a Mailbox update (updatedProperties: the counts).
                    self.log("Mailbox", mailbox_id, UPDATED, counts_only=True)

    def finish(self) -> dict[str, str]:
        self._apply_count_deltas()
        if not self._changes and not self._bumps:
            return {}
        db, aid = self.db, self.account_id
        modseq, pruned = db.execute("SELECT modseq, pruned FROM accounts WHERE id=?", (aid,)).fetchone()
        rows: list[tuple[str, int, str, str, int, int]] = []
        latest: dict[str, int] = {}
        for (type_, oid), change in self._changes.items():
            modseq += 1
            rows.append((aid, modseq, type_, oid, change.kind, int(change.counts_only)))
            latest[type_] = modseq
        for type_ in sorted(self._bumps):
            modseq += 1
            latest[type_] = modseq
        db.executemany("INSERT INTO changes(account_id, modseq, type, object_id, kind, counts_only) "
                       "VALUES(?, ?, ?, ?, ?, ?)", rows)
        db.executemany("UPDATE type_states SET modseq=? WHERE account_id=? AND type=?",
                       [(m, aid, t) for t, m in latest.items()])
        floor = modseq - self.store.change_log_limit
        if floor > pruned:
            # Keep the log bounded; states older than the floor get cannotCalculateChanges.
            db.execute("DELETE FROM changes WHERE account_id=? AND modseq<=?", (aid, floor))
            pruned = floor
        db.execute("UPDATE accounts SET modseq=?, pruned=? WHERE id=?", (modseq, pruned, aid))
        return {t: self.store.format_state(m) for t, m in latest.items()}

    # --- mailboxes ---

    def create_mailbox(self, name: str, parent_id: str | None, role: str | None, sort_order: int,
                       is_subscribed: bool) -> str:
        mailbox_id = new_id("B")
        self.db.execute("INSERT INTO mailboxes(account_id, id, name, parent_id, role, sort_order, "
                        "is_subscribed) VALUES(?, ?, ?, ?, ?, ?, ?)",
                        (self.account_id, mailbox_id, name, parent_id, role, sort_order, int(is_subscribed)))
        self.log("Mailbox", mailbox_id, CREATED)
        return mailbox_id

    def update_mailbox(self, mailbox_id: str, values: dict[str, Any]) -> None:
        columns = {"name": "name", "parentId": "parent_id", "role": "role", "sortOrder": "sort_order",
                   "isSubscribed": "is_subscribed"}
        sets = ", ".join(f"{columns[k]}=?" for k in values)
        params = [int(v) if isinstance(v, bool) else v for v in values.values()]
        self.db.execute(f"UPDATE mailboxes SET {sets} WHERE account_id=? AND id=?",
                        (*params, self.account_id, mailbox_id))
        self.log("Mailbox", mailbox_id, UPDATED)

    def destroy_mailbox(self, mailbox_id: str) -> None:
        self.db.execute("DELETE FROM mailboxes WHERE account_id=? AND id=?", (self.account_id, mailbox_id))
        self.log("Mailbox", mailbox_id, DESTROYED)

    def mailbox_email_ids(self, mailbox_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT email_id FROM email_mailboxes WHERE account_id=? AND mailbox_id=?",
            (self.account_id, mailbox_id))]

    # --- emails ---

    def _find_thread(self, message_ids: list[str]) -> str | None:
        for chunk in _chunks(message_ids, 500):
            marks = ",".join("?" * len(chunk))
            row = self.db.execute(
                f"SELECT thread_id FROM thread_refs WHERE account_id=? AND message_id IN ({marks}) LIMIT 1",
                (self.account_id, *chunk)).fetchone()
            if row:
                return str(row[0])
        return None

    def insert_email(self, parsed: ParsedEmail, raw: bytes, mailbox_ids: Iterable[str],
                     keywords: Iterable[str], received_at: int) -> tuple[str, str]:
        """Store a message in the account; returns (emailId, threadId). Threading (RFC 8621 §3 leaves it to
        the server): a message joins the thread of any message it shares a Message-ID/In-Reply-To/References
        id with, else starts a new one. threadId never changes afterwards."""
        db, aid = self.db, self.account_id
        db.execute("INSERT OR IGNORE INTO blobs(id, data) VALUES(?, ?)", (parsed.blob_id, raw))
        thread_id = self._find_thread(parsed.message_ids)
        if thread_id is None:
            thread_id = new_id("T")
            self.log("Thread", thread_id, CREATED)
        else:
            self.log("Thread", thread_id, UPDATED)
        self.touch_thread(thread_id)
        db.executemany("INSERT OR IGNORE INTO thread_refs(account_id, message_id, thread_id) VALUES(?, ?, ?)",
                       [(aid, mid, thread_id) for mid in parsed.message_ids])
        email_id = new_id("M")
        kws = list(keywords)
        props = parsed.properties
        db.execute(
            "INSERT INTO emails(account_id, id, blob_id, thread_id, received_at, size, keywords, unread, "
            "has_attachment, sent_at, subject_sort, from_sort, to_sort, s_subject, s_from, s_to, s_cc, "
            "s_bcc, s_body, meta) VALUES(" + ", ".join("?" * 20) + ")",
            (aid, email_id, parsed.blob_id, thread_id, received_at, parsed.size, keyword_json(kws),
             int(is_unread(kws)), int(bool(props["hasAttachment"])), parsed.sent_ts,
             base_subject(props["subject"]), address_sort_key(props["from"]), address_sort_key(props["to"]),
             *search_fields(parsed).values(), _json.encode(props).decode()))
        db.executemany("INSERT INTO email_mailboxes(account_id, mailbox_id, email_id) VALUES(?, ?, ?)",
                       [(aid, mb, email_id) for mb in dict.fromkeys(mailbox_ids)])
        self.log("Email", email_id, CREATED)
        return email_id, thread_id

    def update_email(self, email: EmailRow, keywords: set[str] | None, mailbox_ids: set[str] | None) -> bool:
        """Replace keywords and/or mailboxIds; False (and nothing logged) when nothing changes."""
        db, aid = self.db, self.account_id
        kw_changed = keywords is not None and keywords != set(email.keywords)
        mb_changed = mailbox_ids is not None and mailbox_ids != set(email.mailbox_ids)
        if not kw_changed and not mb_changed:
            return False
        self.touch_thread(email.thread_id)
        if kw_changed and keywords is not None:
            db.execute("UPDATE emails SET keywords=?, unread=? WHERE account_id=? AND id=?",
                       (keyword_json(keywords), int(is_unread(keywords)), aid, email.id))
            email.keywords = sorted(keywords)
        if mb_changed and mailbox_ids is not None:
            old = set(email.mailbox_ids)
            db.executemany("DELETE FROM email_mailboxes WHERE account_id=? AND mailbox_id=? AND email_id=?",
                           [(aid, mb, email.id) for mb in old - mailbox_ids])
            db.executemany("INSERT INTO email_mailboxes(account_id, mailbox_id, email_id) VALUES(?, ?, ?)",
                           [(aid, mb, email.id) for mb in mailbox_ids - old])
            email.mailbox_ids = sorted(mailbox_ids)
        self.log("Email", email.id, UPDATED)
        return True

    def destroy_email(self, email: EmailRow) -> None:
        db, aid = self.db, self.account_id
        self.touch_thread(email.thread_id)
        db.execute("DELETE FROM email_mailboxes WHERE account_id=? AND email_id=?", (aid, email.id))
        db.execute("DELETE FROM emails WHERE account_id=? AND id=?", (aid, email.id))
        self.log("Email", email.id, DESTROYED)
        left = db.execute("SELECT 1 FROM emails WHERE account_id=? AND thread_id=? LIMIT 1",
                          (aid, email.thread_id)).fetchone()
        if left:
            self.log("Thread", email.thread_id, UPDATED)
        else:
            # The thread is gone; forget its message ids so a later reply starts a fresh thread.
            db.execute("DELETE FROM thread_refs WHERE account_id=? AND thread_id=?", (aid, email.thread_id))
            self.log("Thread", email.thread_id, DESTROYED)
        db.execute("DELETE FROM blobs WHERE id=? AND NOT EXISTS (SELECT 1 FROM emails WHERE blob_id=?)",
                   (email.blob_id, email.blob_id))

    # --- vacation ---

    def set_vacation(self, data: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO vacation(account_id, data) VALUES(?, ?) "
                        "ON CONFLICT(account_id) DO UPDATE SET data=excluded.data",
                        (self.account_id, _json.encode(data)))
        self.bump("VacationResponse")
