"""Thread/get and Thread/changes (RFC 8621 §3): a thread is the list of its emails, oldest first.

Runs on the store's worker thread.
"""

from __future__ import annotations

from typing import Any

from gateway.backend.methods.common import (
    Args,
    Context,
    check_all_size,
    get_ids,
    get_properties,
    get_response,
)
from gateway.backend.methods.common import changes as changes_of

PROPERTIES = ("id", "emailIds")


def get(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, ("accountId", "ids", "properties"))
    account_id = ctx.account(args)
    ids = get_ids(ctx, args)
    props = get_properties(args, PROPERTIES, PROPERTIES)
    store = ctx.store
    if ids is None:
        ids = store.all_thread_ids(account_id)
        check_all_size(ctx, len(ids))
    members = store.thread_email_ids(account_id, ids)
    found: list[dict[str, Any]] = []
    not_found: list[str] = []
    for thread_id in ids:
        email_ids = members.get(thread_id)
        if not email_ids:
            not_found.append(thread_id)
            continue
        obj: dict[str, Any] = {"id": thread_id}
        if "emailIds" in props:
            obj["emailIds"] = email_ids
        found.append(obj)
    return get_response(account_id, store.state(account_id, "Thread"), found, not_found)


def changes(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    return changes_of(ctx, raw, "Thread")
