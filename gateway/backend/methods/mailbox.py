"""Mailbox/get, /changes, /query, /queryChanges and /set (RFC 8621 §2).

Runs on the store's worker thread.
"""

from __future__ import annotations

from typing import Any

from gateway.backend.methods.common import (
    QUERY_ARGS,
    SET_ARGS,
    Args,
    Context,
    PatchError,
    SetResult,
    check_all_size,
    get_ids,
    get_properties,
    get_response,
    invalid,
    invalid_properties,
    paginate,
    parse_set,
    patch_paths,
    query_changes_unsupported,
    query_response,
    set_error,
    sort_comparators,
    walk_filter,
)
from gateway.backend.methods.common import changes as changes_of
from gateway.backend.store import MailboxRow
from gateway.errors import MethodError

PROPERTIES = ("id", "name", "parentId", "role", "sortOrder", "totalEmails", "unreadEmails", "totalThreads",
              "unreadThreads", "myRights", "isSubscribed")
SERVER_SET = frozenset({"id", "totalEmails", "unreadEmails", "totalThreads", "unreadThreads", "myRights"})
SETTABLE = frozenset({"name", "parentId", "role", "sortOrder", "isSubscribed"})

MAX_DEPTH = 10  # RFC 8621 §1.3.1 maxMailboxDepth
MAX_NAME_OCTETS = 255  # RFC 8621 §1.3.1 maxSizeMailboxName
QUERY_LIMIT = 1000

# RFC 8457 (IANA "IMAP Mailbox Name Attributes") roles a mailbox may have, lowercase as RFC 8621 §2 asks.
ROLES = frozenset({"all", "archive", "drafts", "flagged", "important", "inbox", "junk", "sent", "subscribed",
                   "trash", "snoozed", "scheduled", "memos"})


def _rights(m: MailboxRow) -> dict[str, bool]:
    # The owner and every delegate may do everything, except delete the mailboxes with a role.
    return {"mayReadItems": True, "mayAddItems": True, "mayRemoveItems": True, "maySetSeen": True,
            "maySetKeywords": True, "mayCreateChild": True, "mayRename": True,
            "mayDelete": m.role is None, "maySubmit": True}


def _to_object(m: MailboxRow, props: list[str]) -> dict[str, Any]:
    full = {"id": m.id, "name": m.name, "parentId": m.parent_id, "role": m.role, "sortOrder": m.sort_order,
            "totalEmails": m.total_emails, "unreadEmails": m.unread_emails, "totalThreads": m.total_threads,
            "unreadThreads": m.unread_threads, "myRights": _rights(m), "isSubscribed": m.is_subscribed}
    out: dict[str, Any] = {"id": m.id}
    for p in props:
        out[p] = full[p]
    return out


def get(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, ("accountId", "ids", "properties"))
    account_id = ctx.account(args)
    ids = get_ids(ctx, args)
    props = get_properties(args, PROPERTIES, PROPERTIES)
    rows = {m.id: m for m in ctx.store.mailboxes(account_id)}
    if ids is None:
        check_all_size(ctx, len(rows))
        ids = list(rows)
    found: list[dict[str, Any]] = []
    not_found: list[str] = []
    for requested in ids:
        mailbox_id = ctx.resolve_id(requested)
        row = rows.get(mailbox_id) if mailbox_id else None
        if row is None:
            not_found.append(requested)
        else:
            found.append(_to_object(row, props))
    return get_response(account_id, ctx.store.state(account_id, "Mailbox"), found, not_found)


def changes(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    return changes_of(ctx, raw, "Mailbox")


def query_changes(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    return query_changes_unsupported(ctx, raw)


# --- Mailbox/query (RFC 8621 §2.3) ---

_CONDITIONS = frozenset({"parentId", "name", "role", "hasAnyRole", "isSubscribed"})


def _condition(cond: dict[str, Any], ctx: Context) -> Any:
    unknown = set(cond) - _CONDITIONS
    if unknown:
        raise MethodError("unsupportedFilter",
                          f"Unknown Mailbox filter properties: {', '.join(sorted(unknown))}.")
    for key in ("name",):
        if key in cond and not isinstance(cond[key], str):
            raise invalid(f"The filter property {key} must be a string.")
    for key in ("hasAnyRole", "isSubscribed"):
        if key in cond and not isinstance(cond[key], bool):
            raise invalid(f"The filter property {key} must be a boolean.")
    for key in ("parentId", "role"):
        if key in cond and cond[key] is not None and not isinstance(cond[key], str):
            raise invalid(f"The filter property {key} must be a string or null.")
    parent = ctx.resolve_id(cond["parentId"]) if isinstance(cond.get("parentId"), str) else None

    def test(m: MailboxRow) -> bool:
        if "parentId" in cond and m.parent_id != parent:
            return False
        if "name" in cond and cond["name"].casefold() not in m.name.casefold():
            return False
        if "role" in cond and m.role != cond["role"]:
            return False
        if "hasAnyRole" in cond and (m.role is not None) != cond["hasAnyRole"]:
            return False
        return not ("isSubscribed" in cond and m.is_subscribed != cond["isSubscribed"])

    return test


def _combine(operator: str, tests: list[Any]) -> Any:
    if operator == "AND":
        return lambda m: all(t(m) for t in tests)
    if operator == "OR":
        return lambda m: any(t(m) for t in tests)
    return lambda m: not any(t(m) for t in tests)


def _sort_key(comparators: list[dict[str, Any]]) -> Any:
    def key(m: MailboxRow) -> tuple[Any, ...]:
        parts: list[Any] = []
        for c in comparators:
            value: Any = m.sort_order if c["property"] == "sortOrder" else m.name.casefold()
            parts.append(_Directional(value, c.get("isAscending", True)))
        parts.append(m.id)  # a stable total order
        return tuple(parts)

    return key


class _Directional:
    """A sort key item that can be descending inside a tuple key."""

    __slots__ = ("ascending", "value")

    def __init__(self, value: Any, ascending: bool) -> None:
        self.value = value
        self.ascending = ascending

    def __lt__(self, other: _Directional) -> bool:
        return bool(self.value < other.value) if self.ascending else bool(other.value < self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Directional) and self.value == other.value

    __hash__ = None  # type: ignore[assignment]


def query(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, (*QUERY_ARGS, "sortAsTree", "filterAsTree"))
    account_id = ctx.account(args)
    comparators = sort_comparators(args, ("sortOrder", "name"))
    filter_ = args.value("filter")
    test = walk_filter(filter_, lambda c: _condition(c, ctx), _combine) if filter_ is not None else None
    rows = ctx.store.mailboxes(account_id)
    by_id = {m.id: m for m in rows}
    ordered = sorted(rows, key=_sort_key(comparators or [{"property": "sortOrder"}, {"property": "name"}]))
    if args.boolean("sortAsTree"):
        # RFC 8621 §2.3: parents before their children, siblings in comparator order.
        children: dict[str | None, list[MailboxRow]] = {}
        for m in ordered:
            parent = m.parent_id if m.parent_id in by_id else None
            children.setdefault(parent, []).append(m)
        tree: list[MailboxRow] = []

        def visit(parent: str | None) -> None:
            for child in children.get(parent, []):
                tree.append(child)
                visit(child.id)

        visit(None)
        ordered = tree
    if test is not None:
        matching = {m.id for m in ordered if test(m)}
        if args.boolean("filterAsTree"):
            # RFC 8621 §2.3: a mailbox only matches when all its ancestors match too.
            def ancestors_match(m: MailboxRow) -> bool:
                seen: set[str] = set()
                parent = m.parent_id
                while parent is not None and parent in by_id and parent not in seen:
                    if parent not in matching:
                        return False
                    seen.add(parent)
                    parent = by_id[parent].parent_id
                return True

            matching = {i for i in matching if ancestors_match(by_id[i])}
        ordered = [m for m in ordered if m.id in matching]
    ids = [m.id for m in ordered]
    page = paginate(ids, args, QUERY_LIMIT)
    total = len(ids) if args.boolean("calculateTotal") else None
    return query_response(account_id, ctx.store.state(account_id, "Mailbox"), page, total)


# --- Mailbox/set (RFC 8621 §2.5) ---

class _Invalid(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("description"))
        self.error = error


def _depth(parent_id: str | None, rows: dict[str, MailboxRow]) -> int:
    depth, seen = 1, set()
    while parent_id is not None and parent_id in rows and parent_id not in seen:
        seen.add(parent_id)
        depth += 1
        parent_id = rows[parent_id].parent_id
    return depth


def _is_descendant(candidate: str, ancestor: str, rows: dict[str, MailboxRow]) -> bool:
    seen: set[str] = set()
    current: str | None = candidate
    while current is not None and current in rows and current not in seen:
        if current == ancestor:
            return True
        seen.add(current)
        current = rows[current].parent_id
    return False


def _check_values(ctx: Context, values: dict[str, Any], rows: dict[str, MailboxRow], self_id: str | None
                  ) -> dict[str, Any]:
    """Validate settable properties; returns them with parentId resolved. Raises _Invalid."""
    out: dict[str, Any] = {}
    for prop, value in values.items():
        if prop in SERVER_SET:
            raise _Invalid(invalid_properties([prop], f"{prop} is set by the server."))
        if prop not in SETTABLE:
            raise _Invalid(invalid_properties([prop], f"Mailbox has no property {prop!r}."))
        if prop == "name":
            if not isinstance(value, str) or not value.strip():
                raise _Invalid(invalid_properties(["name"], "name must be a non-empty string."))
            if len(value.encode()) > MAX_NAME_OCTETS or any(ord(c) < 32 for c in value):
                raise _Invalid(invalid_properties(["name"], f"name must be at most {MAX_NAME_OCTETS} octets "
                                                  "with no control characters."))
        elif prop == "parentId":
            if value is not None:
                if not isinstance(value, str):
                    raise _Invalid(invalid_properties(["parentId"], "parentId must be an id or null."))
                resolved = ctx.resolve_id(value)
                if resolved is None or resolved not in rows:
                    raise _Invalid(invalid_properties(["parentId"], f"There is no mailbox {value!r}."))
                value = resolved
        elif prop == "role":
            if value is not None and (not isinstance(value, str) or value not in ROLES):
                raise _Invalid(invalid_properties(["role"], f"role must be null or one of {sorted(ROLES)}."))
            if self_id is not None and rows[self_id].role == "inbox" and value != "inbox":
                # Deliveries go to the inbox; taking its role away would leave them nowhere to go.
                raise _Invalid(invalid_properties(["role"], "The inbox keeps its role."))
            if value is not None and any(m.role == value and m.id != self_id for m in rows.values()):
                raise _Invalid(invalid_properties(["role"], f"Another mailbox has the role {value!r}."))
        elif prop == "sortOrder":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 31:
                raise _Invalid(invalid_properties(["sortOrder"], "sortOrder must be from 0 to 2^31-1."))
        elif not isinstance(value, bool):  # isSubscribed
            raise _Invalid(invalid_properties(["isSubscribed"], "isSubscribed must be a boolean."))
        out[prop] = value
    return out


def _check_place(name: str, parent_id: str | None, rows: dict[str, MailboxRow], self_id: str | None) -> None:
    # RFC 8621 §2.5: no two siblings share a name; the tree is at most maxMailboxDepth deep.
    for m in rows.values():
        if m.id != self_id and m.parent_id == parent_id and m.name == name:
            raise _Invalid(invalid_properties(["name"], f"A sibling mailbox is already called {name!r}."))
    if _depth(parent_id, rows) > MAX_DEPTH:
        raise _Invalid(invalid_properties(["parentId"], f"Mailboxes nest at most {MAX_DEPTH} deep."))


def set_(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, (*SET_ARGS, "onDestroyRemoveEmails"))
    req = parse_set(ctx, args, "Mailbox")
    remove_emails = args.boolean("onDestroyRemoveEmails")
    store = ctx.store
    result = SetResult()
    with ctx.write() as tx:
        writer = tx.account(req.account_id)
        rows = {m.id: m for m in store.mailboxes(req.account_id)}

        # Creates first (RFC 8620 §5.3), in passes so a child may name a parent created in the same call.
        pending = dict(req.create)
        progress = True
        while pending and progress:
            progress = False
            for creation_id, obj in list(pending.items()):
                parent_ref = obj.get("parentId") if isinstance(obj, dict) else None
                if isinstance(parent_ref, str) and parent_ref.startswith("#") and parent_ref[1:] in pending \
                        and parent_ref[1:] != creation_id:
                    continue  # its parent is not created yet
                del pending[creation_id]
                progress = True
                try:
                    if not isinstance(obj, dict):
                        raise _Invalid(invalid_properties([], "A create must be a Mailbox object."))
                    values = _check_values(ctx, obj, rows, None)
                    if "name" not in values:
                        raise _Invalid(invalid_properties(["name"], "name is required."))
                    parent_id = values.get("parentId")
                    _check_place(values["name"], parent_id, rows, None)
                except _Invalid as exc:
                    result.not_created[creation_id] = exc.error
                    continue
                new = MailboxRow("", values["name"], parent_id, values.get("role"),
                                 values.get("sortOrder", 0), values.get("isSubscribed", True), 0, 0, 0, 0)
                new.id = writer.create_mailbox(new.name, new.parent_id, new.role, new.sort_order,
                                               new.is_subscribed)
                rows[new.id] = new
                ctx.created_ids[creation_id] = new.id
                created = _to_object(new, list(PROPERTIES))
                # Report what the server set or defaulted, not what the client sent.
                result.created[creation_id] = {k: v for k, v in created.items() if k not in obj}
        for creation_id in pending:
            result.not_created[creation_id] = invalid_properties(["parentId"], "The parent is never created.")

        for requested, patch in req.update.items():
            mailbox_id = ctx.resolve_id(requested)
            if mailbox_id is None or mailbox_id not in rows:
                result.not_updated[requested] = set_error("notFound", f"There is no mailbox {requested!r}.")
                continue
            try:
                if not isinstance(patch, dict):
                    raise _Invalid(set_error("invalidPatch", "An update must be a PatchObject."))
                try:
                    paths = patch_paths(patch)
                except PatchError as exc:
                    raise _Invalid(set_error("invalidPatch", str(exc))) from None
                deep = ["/".join(p) for p, _ in paths if len(p) > 1]
                if deep:
                    raise _Invalid(invalid_properties(deep, "Mailbox properties are replaced whole."))
                values = _check_values(ctx, {p[0]: v for p, v in paths}, rows, mailbox_id)
                row = rows[mailbox_id]
                name = values.get("name", row.name)
                parent_id = values.get("parentId", row.parent_id)
                if "parentId" in values and parent_id is not None \
                        and _is_descendant(parent_id, mailbox_id, rows):
                    raise _Invalid(invalid_properties(["parentId"], "A mailbox cannot move below itself."))
                if "name" in values or "parentId" in values:
                    _check_place(name, parent_id, rows, mailbox_id)
            except _Invalid as exc:
                result.not_updated[requested] = exc.error
                continue
            changed = {k: v for k, v in values.items() if v != _current(row, k)}
            if changed:
                writer.update_mailbox(mailbox_id, changed)
                row.name, row.parent_id = name, parent_id
                row.role = values.get("role", row.role)
                row.sort_order = values.get("sortOrder", row.sort_order)
                row.is_subscribed = values.get("isSubscribed", row.is_subscribed)
            result.updated[requested] = None

        # Children before parents, so a call may destroy a whole subtree.
        targets = [(r, ctx.resolve_id(r)) for r in req.destroy]
        targets.sort(key=lambda t: -_depth(t[1], rows) if t[1] in rows else 0)
        for requested, mailbox_id in targets:
            if mailbox_id is None or mailbox_id not in rows:
                result.not_destroyed[requested] = set_error("notFound", f"There is no mailbox {requested!r}.")
                continue
            row = rows[mailbox_id]
            if row.role is not None:
                result.not_destroyed[requested] = set_error(
                    "forbidden", f"The {row.role} mailbox belongs to the account and cannot be destroyed.")
                continue
            if any(m.parent_id == mailbox_id for m in rows.values()):
                result.not_destroyed[requested] = set_error("mailboxHasChild",
                                                            "Destroy the child mailboxes first.")
                continue
            email_ids = writer.mailbox_email_ids(mailbox_id)
            if email_ids and not remove_emails:
                result.not_destroyed[requested] = set_error(
                    "mailboxHasEmail", f"The mailbox holds {len(email_ids)} emails; set "
                    "onDestroyRemoveEmails or move them first.")
                continue
            # RFC 8621 §2.5 onDestroyRemoveEmails: emails only here are destroyed, the others just leave it.
            for email in store.emails(req.account_id, email_ids, with_meta=False).values():
                if set(email.mailbox_ids) <= {mailbox_id}:
                    writer.destroy_email(email)
                else:
                    writer.update_email(email, None, set(email.mailbox_ids) - {mailbox_id})
            writer.destroy_mailbox(mailbox_id)
            del rows[mailbox_id]
            result.destroyed.append(requested)
    return result.response(req.account_id, req.old_state, store.state(req.account_id, "Mailbox"))


def _current(row: MailboxRow, prop: str) -> Any:
    return {"name": row.name, "parentId": row.parent_id, "role": row.role, "sortOrder": row.sort_order,
            "isSubscribed": row.is_subscribed}[prop]
