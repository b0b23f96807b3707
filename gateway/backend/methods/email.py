"""Email/get, /changes, /query, /queryChanges and /set (RFC 8621 §4), and blob reading for downloads.

Runs on the store's worker thread.
"""

from __future__ import annotations

from datetime import UTC, datetime
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
)
from gateway.backend.methods.common import changes as changes_of
from gateway.backend.methods.query import SORT_OPTIONS, compile_filter, compile_sort, valid_keyword
from gateway.backend.mime.common import format_utc, parse_date, parse_header_property
from gateway.backend.mime.compose import ComposeError, MissingBlobs, compose_message
from gateway.backend.mime.parse import body_values, header_value, leaf_content, parse_message
from gateway.backend.store import EmailRow, Store

# RFC 8621 §4.1 properties this server returns, and §4.2's defaults for Email/get.
PROPERTIES = ("id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "messageId",
              "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo", "subject", "sentAt",
              "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody", "attachments", "headers",
              "bodyStructure")
DEFAULT_PROPERTIES = PROPERTIES[:-2]
BODY_PROPERTIES = ("partId", "blobId", "size", "headers", "name", "type", "charset", "disposition", "cid",
                   "language", "location", "subParts")
DEFAULT_BODY_PROPERTIES = ("partId", "blobId", "size", "name", "type", "charset", "disposition", "cid",
                           "language", "location")
_ROW_PROPERTIES = frozenset({"id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt"})
_META_PROPERTIES = frozenset({"messageId", "inReplyTo", "references", "sender", "from", "to", "cc", "bcc",
                              "replyTo", "subject", "sentAt", "hasAttachment", "preview", "headers"})

SERVER_SET = frozenset({"id", "blobId", "threadId", "size", "preview", "hasAttachment"})
CREATE_PROPERTIES = frozenset({"mailboxIds", "keywords", "receivedAt", "messageId", "inReplyTo", "references",
                               "sender", "from", "to", "cc", "bcc", "replyTo", "subject", "sentAt", "headers",
                               "bodyStructure", "textBody", "htmlBody", "attachments", "bodyValues"})
QUERY_LIMIT = 1000


def _header_property(prop: str) -> bool:
    try:
        return parse_header_property(prop) is not None
    except ValueError as exc:
        raise invalid(f"Bad header property {prop!r}: {exc}.") from None


def _part(node: dict[str, Any], body_props: list[str], tree: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bp in body_props:
        if bp == "subParts":
            continue
        hp = parse_header_property(bp)
        out[bp] = header_value(node["headers"], hp) if hp else node.get(bp)
    if tree and "subParts" in node:
        # A multipart node always shows its children: bodyStructure is a tree or it is nothing.
        out["subParts"] = [_part(sub, body_props, True) for sub in node["subParts"]]
    return out


def _parts_by_id(node: dict[str, Any], index: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if node.get("partId"):
        index[node["partId"]] = node
    for sub in node.get("subParts", ()):
        _parts_by_id(sub, index)
    return index


def _text_ids(part_ids: list[str], index: dict[str, dict[str, Any]]) -> list[str]:
    return [p for p in part_ids if index[p]["type"].startswith("text/")]


def get(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, ("accountId", "ids", "properties", "bodyProperties", "fetchTextBodyValues",
                      "fetchHTMLBodyValues", "fetchAllBodyValues", "maxBodyValueBytes"))
    account_id = ctx.account(args)
    ids = get_ids(ctx, args)
    props = get_properties(args, PROPERTIES, DEFAULT_PROPERTIES, _header_property)
    body_props = get_properties(args, BODY_PROPERTIES, DEFAULT_BODY_PROPERTIES, _header_property,
                                name="bodyProperties")
    fetch_text = args.boolean("fetchTextBodyValues")
    fetch_html = args.boolean("fetchHTMLBodyValues")
    fetch_all = args.boolean("fetchAllBodyValues")
    max_bytes = args.integer("maxBodyValueBytes", 0, minimum=0) or 0
    store = ctx.store
    if ids is None:
        check_all_size(ctx, store.count_emails(account_id))
        ids = store.all_email_ids(account_id)
    resolved = [(r, ctx.resolve_id(r)) for r in ids]
    needs_meta = any(p not in _ROW_PROPERTIES for p in props)
    rows = store.emails(account_id, [i for _, i in resolved if i], with_meta=needs_meta)
    found: list[dict[str, Any]] = []
    not_found: list[str] = []
    for requested, email_id in resolved:
        row = rows.get(email_id) if email_id else None
        if row is None:
            not_found.append(requested)
            continue
        found.append(_email_object(store, row, props, body_props, (fetch_text, fetch_html, fetch_all),
                                   max_bytes))
    return get_response(account_id, store.state(account_id, "Email"), found, not_found)


def _email_object(store: Store, row: EmailRow, props: list[str], body_props: list[str],
                  fetch: tuple[bool, bool, bool], max_bytes: int) -> dict[str, Any]:
    meta = row.meta
    out: dict[str, Any] = {"id": row.id}
    index: dict[str, dict[str, Any]] | None = None
    for p in props:
        if p == "id":
            continue
        if p == "blobId":
            out[p] = row.blob_id
        elif p == "threadId":
            out[p] = row.thread_id
        elif p == "mailboxIds":
            out[p] = {m: True for m in sorted(row.mailbox_ids)}
        elif p == "keywords":
            out[p] = {k: True for k in sorted(row.keywords)}
        elif p == "size":
            out[p] = row.size
        elif p == "receivedAt":
            out[p] = format_utc(row.received_at)
        elif p in _META_PROPERTIES:
            out[p] = meta[p]
        elif p == "bodyStructure":
            out[p] = _part(meta["bodyStructure"], body_props, True)
        elif p in ("textBody", "htmlBody", "attachments"):
            index = index or _parts_by_id(meta["bodyStructure"], {})
            out[p] = [_part(index[pid], body_props, False) for pid in meta[p]]
        elif p == "bodyValues":
            index = index or _parts_by_id(meta["bodyStructure"], {})
            wanted: list[str] = []
            fetch_text, fetch_html, fetch_all = fetch
            if fetch_all:
                wanted = _text_ids(list(index), index)
            else:
                if fetch_text:
                    wanted += _text_ids(meta["textBody"], index)
                if fetch_html:
                    wanted += _text_ids(meta["htmlBody"], index)
            raw = store.blob(row.blob_id) if wanted else None
            out[p] = body_values(raw, wanted, max_bytes) if raw is not None else {}
        else:
            hp = parse_header_property(p)
            assert hp is not None
            out[p] = header_value(meta["headers"], hp)
    return out


def read_blob(store: Store, account_id: str, blob_id: str) -> bytes | None:
    """A blob the account may read: a message's bytes (`G<sha256>`) or one of its parts
    (`G<sha256>_<partId>`), and only when one of the account's emails holds it."""
    message_blob, _, part_id = blob_id.partition("_")
    if not store.account_has_blob(account_id, message_blob):
        return None
    raw = store.blob(message_blob)
    if raw is None or not part_id:
        return raw
    return leaf_content(raw, part_id)


def changes(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    return changes_of(ctx, raw, "Email")


def query_changes(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    return query_changes_unsupported(ctx, raw)


def query(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, (*QUERY_ARGS, "collapseThreads"))
    account_id = ctx.account(args)
    comparators = sort_comparators(args, SORT_OPTIONS)
    where, where_params = compile_filter(args.value("filter"), ctx)
    order, order_params = compile_sort(comparators)
    rows = ctx.store.query_email_ids(account_id, where, [*where_params, *order_params], order)
    if args.boolean("collapseThreads"):
        # RFC 8621 §4.4.3: only the first email of each thread (in sort order) stays.
        seen: set[str] = set()
        ids = []
        for email_id, thread_id in rows:
            if thread_id not in seen:
                seen.add(thread_id)
                ids.append(email_id)
    else:
        ids = [email_id for email_id, _ in rows]
    page = paginate(ids, args, QUERY_LIMIT)
    total = len(ids) if args.boolean("calculateTotal") else None
    return query_response(account_id, ctx.store.state(account_id, "Email"), page, total)


# --- Email/set (RFC 8621 §4.6) ---

class _SetError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("description"))
        self.error = error


def _keywords(value: Any, prop: str = "keywords") -> set[str]:
    if not isinstance(value, dict) or not all(v is True for v in value.values()):
        raise _SetError(invalid_properties([prop], "keywords is an object of keyword -> true."))
    bad = [k for k in value if not valid_keyword(k)]
    if bad:
        raise _SetError(invalid_properties([prop], f"Not keywords (RFC 8621 §4.1.1): {', '.join(bad)}."))
    # RFC 8621 §4.1.1: keywords are case-insensitive; this server keeps them lowercase.
    return {k.lower() for k in value}


def _mailbox_ids(ctx: Context, value: Any, existing: set[str]) -> set[str]:
    if not isinstance(value, dict) or not all(v is True for v in value.values()):
        raise _SetError(invalid_properties(["mailboxIds"], "mailboxIds is an object of mailbox id -> true."))
    out: set[str] = set()
    for ref in value:
        mailbox_id = ctx.resolve_id(ref)
        if mailbox_id is None or mailbox_id not in existing:
            raise _SetError(invalid_properties(["mailboxIds"], f"There is no mailbox {ref!r}."))
        out.add(mailbox_id)
    if not out:
        raise _SetError(invalid_properties(["mailboxIds"], "An email must be in at least one mailbox."))
    return out


def _check_create(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise _SetError(invalid_properties([], "A create must be an Email object."))
    server_set = sorted(k for k in obj if k in SERVER_SET)
    if server_set:
        raise _SetError(invalid_properties(server_set, f"Set by the server: {', '.join(server_set)}."))
    unknown = sorted(k for k in obj if k not in CREATE_PROPERTIES and not k.startswith("header:"))
    if unknown:
        raise _SetError(invalid_properties(unknown, f"Email has no properties {', '.join(unknown)}."))
    if "mailboxIds" not in obj:
        raise _SetError(invalid_properties(["mailboxIds"], "mailboxIds is required."))


def _apply_patch(ctx: Context, row: EmailRow, patch: Any, existing: set[str]
                 ) -> tuple[set[str] | None, set[str] | None]:
    """RFC 8621 §4.6: only keywords and mailboxIds change, whole or one key at a time (`keywords/$seen`)."""
    if not isinstance(patch, dict):
        raise _SetError(set_error("invalidPatch", "An update must be a PatchObject."))
    try:
        paths = patch_paths(patch)
    except PatchError as exc:
        raise _SetError(set_error("invalidPatch", str(exc))) from None
    keywords: set[str] | None = None
    mailboxes: set[str] | None = None
    for tokens, value in paths:
        path = "/".join(tokens)
        head = tokens[0]
        if head == "keywords" and len(tokens) == 1:
            keywords = _keywords(value)
        elif head == "keywords" and len(tokens) == 2:
            keywords = set(row.keywords) if keywords is None else keywords
            keyword = tokens[1]
            if not valid_keyword(keyword):
                raise _SetError(invalid_properties([path], f"{keyword!r} is not a valid keyword."))
            if value is True:
                keywords.add(keyword.lower())
            elif value is None:
                keywords.discard(keyword.lower())
            else:
                raise _SetError(invalid_properties([path], "A keyword is set with true, removed with null."))
        elif head == "mailboxIds" and len(tokens) == 1:
            mailboxes = _mailbox_ids(ctx, value, existing)
        elif head == "mailboxIds" and len(tokens) == 2:
            mailboxes = set(row.mailbox_ids) if mailboxes is None else mailboxes
            mailbox_id = ctx.resolve_id(tokens[1])
            if value is True:
                if mailbox_id is None or mailbox_id not in existing:
                    raise _SetError(invalid_properties([path], f"There is no mailbox {tokens[1]!r}."))
                mailboxes.add(mailbox_id)
            elif value is None:
                if mailbox_id is not None:
                    mailboxes.discard(mailbox_id)
            else:
                raise _SetError(invalid_properties([path], "Add a mailbox with true, remove it with null."))
        elif head in ("keywords", "mailboxIds"):
            raise _SetError(set_error("invalidPatch", f"{path!r} goes deeper than a {head} key."))
        elif head in PROPERTIES or head in CREATE_PROPERTIES or head.startswith("header:"):
            raise _SetError(invalid_properties([path], f"{head} cannot change after the email is created."))
        else:
            raise _SetError(invalid_properties([path], f"Email has no property {head!r}."))
    if mailboxes is not None and not mailboxes:
        raise _SetError(invalid_properties(["mailboxIds"], "An email must stay in at least one mailbox."))
    return keywords, mailboxes


def set_(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, SET_ARGS)
    req = parse_set(ctx, args, "Email")
    store = ctx.store
    account_id = req.account_id
    result = SetResult()
    existing = store.mailbox_ids(account_id)
    username = store.username_of(account_id)
    id_domain = username.rpartition("@")[2] or "localhost"
    with ctx.write() as tx:
        writer = tx.account(account_id)
        for creation_id, obj in req.create.items():
            try:
                _check_create(obj)
                mailboxes = _mailbox_ids(ctx, obj["mailboxIds"], existing)
                keywords = _keywords(obj["keywords"]) if obj.get("keywords") is not None else set()
                received_at = int(ctx.clock())
                if obj.get("receivedAt") is not None:
                    when = parse_date(obj["receivedAt"], utc=True)
                    if when is None:
                        raise _SetError(invalid_properties(["receivedAt"], "receivedAt must be a UTCDate."))
                    received_at = int(when.timestamp())
                content = {k: v for k, v in obj.items() if k not in ("mailboxIds", "keywords", "receivedAt")}
                raw_message = compose_message(
                    content, fetch_blob=lambda b: read_blob(store, account_id, b), id_domain=id_domain,
                    now=datetime.fromtimestamp(ctx.clock(), UTC))
            except _SetError as exc:
                result.not_created[creation_id] = exc.error
                continue
            except ComposeError as exc:
                result.not_created[creation_id] = invalid_properties(exc.properties, exc.description)
                continue
            except MissingBlobs as exc:
                result.not_created[creation_id] = set_error(
                    "blobNotFound", "Some blobIds are not in this account.", notFound=exc.blob_ids)
                continue
            parsed = parse_message(raw_message)
            email_id, thread_id = writer.insert_email(parsed, raw_message, mailboxes, keywords, received_at)
            ctx.created_ids[creation_id] = email_id
            created: dict[str, Any] = {"id": email_id, "blobId": parsed.blob_id, "threadId": thread_id,
                                       "size": parsed.size}
            if obj.get("receivedAt") is None:
                created["receivedAt"] = format_utc(received_at)
            result.created[creation_id] = created

        targets = {r: ctx.resolve_id(r) for r in [*req.update, *req.destroy]}
        rows = store.emails(account_id, [i for i in targets.values() if i], with_meta=False)
        for requested, patch in req.update.items():
            target = targets[requested]
            row = rows.get(target) if target else None
            if row is None:
                result.not_updated[requested] = set_error("notFound", f"There is no email {requested!r}.")
                continue
            try:
                keywords_new, mailboxes_new = _apply_patch(ctx, row, patch, existing)
            except _SetError as exc:
                result.not_updated[requested] = exc.error
                continue
            writer.update_email(row, keywords_new, mailboxes_new)
            result.updated[requested] = None

        for requested in req.destroy:
            target = targets[requested]
            row = rows.pop(target, None) if target else None
            if row is None:
                result.not_destroyed[requested] = set_error("notFound", f"There is no email {requested!r}.")
                continue
            writer.destroy_email(row)
            result.destroyed.append(requested)
    return result.response(account_id, req.old_state, store.state(account_id, "Email"))
