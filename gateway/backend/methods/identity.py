"""Identity/get and Identity/changes (RFC 8621 §6): one fixed identity per account, made from its owner's
username. Identities cannot be created or changed here, so their state never moves.

Runs on the store's worker thread.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gateway.backend.methods.common import Args, Context, get_ids, get_properties, get_response
from gateway.errors import MethodError

PROPERTIES = ("id", "name", "email", "replyTo", "bcc", "textSignature", "htmlSignature", "mayDelete")
STATE = "1"


def identity_id(username: str) -> str:
    return "I" + hashlib.sha256(username.encode()).hexdigest()[:20]


def get(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, ("accountId", "ids", "properties"))
    account_id = ctx.account(args)
    ids = get_ids(ctx, args)
    props = get_properties(args, PROPERTIES, PROPERTIES)
    username = ctx.store.username_of(account_id)
    full = {"id": identity_id(username), "name": "", "email": username, "replyTo": None, "bcc": None,
            "textSignature": "", "htmlSignature": "", "mayDelete": False}
    identity = {"id": full["id"], **{p: full[p] for p in props}}
    if ids is None:
        return get_response(account_id, STATE, [identity], [])
    found = [identity for i in ids if i == full["id"]][:1]
    return get_response(account_id, STATE, found, [i for i in ids if i != full["id"]])


def changes(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, ("accountId", "sinceState", "maxChanges"))
    account_id = ctx.account(args)
    since = args.string("sinceState", required=True)
    args.integer("maxChanges", None, minimum=1)
    if since != STATE:
        raise MethodError("cannotCalculateChanges", f"The Identity state {since!r} is unknown.")
    return {"accountId": account_id, "oldState": since, "newState": STATE, "hasMoreChanges": False,
            "created": [], "updated": [], "destroyed": []}
