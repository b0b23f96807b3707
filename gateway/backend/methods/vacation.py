"""VacationResponse/get and /set (RFC 8621 §8): one singleton object per account, stored and reported.

Storing it is all this server does; it sends no automatic replies. Runs on the store's worker thread.
"""

from __future__ import annotations

from typing import Any

from gateway.backend.methods.common import (
    SET_ARGS,
    Args,
    Context,
    PatchError,
    SetResult,
    get_ids,
    get_properties,
    get_response,
    invalid_properties,
    parse_set,
    patch_paths,
    set_error,
)
from gateway.backend.mime.common import parse_date

SINGLETON = "singleton"
PROPERTIES = ("id", "isEnabled", "fromDate", "toDate", "subject", "textBody", "htmlBody")
DEFAULTS: dict[str, Any] = {"isEnabled": False, "fromDate": None, "toDate": None, "subject": None,
                            "textBody": None, "htmlBody": None}


def _current(ctx: Context, account_id: str) -> dict[str, Any]:
    return {**DEFAULTS, **(ctx.store.vacation(account_id) or {})}


def get(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, ("accountId", "ids", "properties"))
    account_id = ctx.account(args)
    ids = get_ids(ctx, args)
    props = get_properties(args, PROPERTIES, PROPERTIES)
    current = _current(ctx, account_id)
    obj = {"id": SINGLETON, **{p: current[p] for p in props if p != "id"}}
    state = ctx.store.state(account_id, "VacationResponse")
    if ids is None:
        return get_response(account_id, state, [obj], [])
    return get_response(account_id, state, [obj] if SINGLETON in ids else [],
                        [i for i in ids if i != SINGLETON])


def _check(prop: str, value: Any) -> Any:
    if prop == "isEnabled":
        if not isinstance(value, bool):
            raise ValueError("isEnabled must be a boolean")
    elif prop in ("fromDate", "toDate"):
        if value is not None and parse_date(value, utc=True) is None:
            raise ValueError(f"{prop} must be a UTCDate or null")
    elif value is not None and not isinstance(value, str):
        raise ValueError(f"{prop} must be a string or null")
    return value


def set_(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    args = Args(raw, SET_ARGS)
    req = parse_set(ctx, args, "VacationResponse")
    result = SetResult()
    # RFC 8621 §8: the singleton can neither be created nor destroyed.
    for creation_id in req.create:
        result.not_created[creation_id] = set_error("singleton", "There is exactly one VacationResponse.")
    for requested in req.destroy:
        result.not_destroyed[requested] = set_error("singleton", "There is exactly one VacationResponse.")
    with ctx.write() as tx:
        for requested, patch in req.update.items():
            if requested != SINGLETON:
                result.not_updated[requested] = set_error("notFound", "The VacationResponse is singleton.")
                continue
            if not isinstance(patch, dict):
                result.not_updated[requested] = set_error("invalidPatch", "An update must be a PatchObject.")
                continue
            try:
                paths = patch_paths(patch)
            except PatchError as exc:
                result.not_updated[requested] = set_error("invalidPatch", str(exc))
                continue
            current = _current(ctx, req.account_id)
            updated = dict(current)
            error: dict[str, Any] | None = None
            for tokens, value in paths:
                path = "/".join(tokens)
                if len(tokens) > 1 or tokens[0] not in DEFAULTS:
                    error = invalid_properties([path], f"VacationResponse has no settable property {path!r}.")
                    break
                try:
                    updated[tokens[0]] = _check(tokens[0], value)
                except ValueError as exc:
                    error = invalid_properties([path], str(exc))
                    break
            if error is not None:
                result.not_updated[requested] = error
                continue
            if updated != current:
                tx.account(req.account_id).set_vacation(updated)
            result.updated[requested] = None
    return result.response(req.account_id, req.old_state, ctx.store.state(req.account_id, "VacationResponse"))
