"""What every JMAP method of the embedded backend shares: the call context, typed argument reading with
RFC 8620 §3.6.2 errors, and the standard /get, /changes and /set shapes (RFC 8620 §5.1-§5.3).

Runs on the store's worker thread; no I/O besides the store.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gateway.backend.store import Store, Transaction
from gateway.directory import Principal
from gateway.errors import MethodError


@dataclass(frozen=True)
class Limits:
    max_objects_in_get: int
    max_objects_in_set: int


@dataclass
class Context:
    """One request's view of the store: who asks, the creation ids so far, and the states it moved."""

    store: Store
    principal: Principal
    limits: Limits
    created_ids: dict[str, str] = field(default_factory=dict)
    new_states: dict[str, dict[str, str]] = field(default_factory=dict)  # accountId -> type -> state
    clock: Callable[[], float] = time.time

    def account(self, args: Args) -> str:
        """The call's accountId, checked against what the principal may use (RFC 8620 §3.6.2)."""
        account_id = args.string("accountId", required=True)
        assert account_id is not None
        for account in self.principal.accounts:
            if account.id == account_id:
                self.store.ensure_account(account.id, account.owner)
                return account_id
        raise MethodError("accountNotFound", f"The account {account_id!r} does not exist or is not yours.")

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """A store transaction whose new states, once committed, are kept for the request's events."""
        with self.store.transaction() as tx:
            yield tx
        for account_id, states in tx.new_states.items():
            self.new_states.setdefault(account_id, {}).update(states)

    def resolve_id(self, value: str) -> str | None:
        """RFC 8620 §5.3: `#creationId` stands for the id created earlier in this request; None if unknown."""
        if value.startswith("#"):
            return self.created_ids.get(value[1:])
        return value


def invalid(description: str) -> MethodError:
    return MethodError("invalidArguments", description)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Args:
    """A method's arguments, with unknown ones refused and each read checked for its JSON type."""

    def __init__(self, raw: dict[str, Any], allowed: Iterable[str]) -> None:
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise invalid(f"Unknown argument{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}.")
        self.raw = raw

    def has(self, name: str) -> bool:
        return name in self.raw

    def value(self, name: str) -> Any:
        return self.raw.get(name)

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise invalid(f"The argument {name} is required.")
            return None
        if not isinstance(value, str):
            raise invalid(f"The argument {name} must be a string.")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(f"The argument {name} must be a boolean.")
        return value

    def integer(self, name: str, default: int | None, *, minimum: int | None = None) -> int | None:
        value = self.raw.get(name)
        if value is None:
            return default
        if not _is_int(value) or (minimum is not None and value < minimum):
            bound = f" of at least {minimum}" if minimum is not None else ""
            raise invalid(f"The argument {name} must be an integer{bound}.")
        return int(value)

    def obj(self, name: str) -> dict[str, Any] | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise invalid(f"The argument {name} must be an object.")
        return value

    def string_list(self, name: str) -> list[str] | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise invalid(f"The argument {name} must be a list of strings.")
        return value


# --- /get (RFC 8620 §5.1) --------------------------------------------------------------------------------

def get_ids(ctx: Context, args: Args) -> list[str] | None:
    """The `ids` argument (null = all), without repeats, checked against maxObjectsInGet."""
    ids = args.string_list("ids")
    if ids is not None:
        # RFC 8620 §5.1: an id asked for twice is answered once (in `list` or in `notFound`).
        ids = list(dict.fromkeys(ids))
    if ids is not None and len(ids) > ctx.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", f"{len(ids)} ids asked; maxObjectsInGet is "
                          f"{ctx.limits.max_objects_in_get}.")
    return ids


def check_all_size(ctx: Context, count: int) -> None:
    """`ids: null` asks for every object; refuse when there are more than maxObjectsInGet."""
    if count > ctx.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", f"ids is null and there are {count} objects; maxObjectsInGet is "
                          f"{ctx.limits.max_objects_in_get}. Ask for ids.")


def get_properties(args: Args, allowed: Iterable[str], default: Iterable[str],
                   extra: Callable[[str], bool] | None = None, name: str = "properties") -> list[str]:
    """The `properties` argument: unknown names are invalidArguments; `id` is always returned."""
    props = args.string_list(name)
    if props is None:
        return list(default)
    known = set(allowed)
    unknown = [p for p in props if p not in known and not (extra and extra(p))]
    if unknown:
        raise invalid(f"Unknown {'property' if len(unknown) == 1 else 'properties'} in {name}: "
                      f"{', '.join(unknown)}.")
    return list(dict.fromkeys(props))


def get_response(account_id: str, state: str, found: list[dict[str, Any]], not_found: list[str]
                 ) -> dict[str, Any]:
    return {"accountId": account_id, "state": state, "list": found, "notFound": not_found}


# --- /changes (RFC 8620 §5.2) ------------------------------------------------------------------------------

CHANGES_ARGS = ("accountId", "sinceState", "maxChanges")


def changes(ctx: Context, raw: dict[str, Any], type_: str) -> dict[str, Any]:
    args = Args(raw, CHANGES_ARGS)
    account_id = ctx.account(args)
    since = args.string("sinceState", required=True)
    assert since is not None
    # RFC 8620 §5.2: maxChanges, when given, must be a positive integer.
    max_changes = args.integer("maxChanges", None, minimum=1)
    store = ctx.store
    modseq = store.since_modseq(account_id, type_, since)
    if modseq is None:
        raise MethodError("cannotCalculateChanges",
                          f"The state {since!r} is unknown or too old for {type_}; resynchronise from "
                          f"{type_}/get.")
    rows = store.changes_since(account_id, type_, modseq, max_changes)
    response: dict[str, Any] = {
        "accountId": account_id, "oldState": since, "newState": store.format_state(rows.new_modseq),
        "hasMoreChanges": rows.has_more, "created": rows.created, "updated": rows.updated,
        "destroyed": rows.destroyed,
    }
    if type_ == "Mailbox":
        # RFC 8621 §2.2: when only counts changed, say which properties; null means "anything may have".
        response["updatedProperties"] = list(COUNT_PROPERTIES) if rows.counts_only else None
    return response


COUNT_PROPERTIES = ("totalEmails", "unreadEmails", "totalThreads", "unreadThreads")


# --- /set (RFC 8620 §5.3) ----------------------------------------------------------------------------------

SET_ARGS = ("accountId", "ifInState", "create", "update", "destroy")


@dataclass
class SetRequest:
    account_id: str
    old_state: str
    create: dict[str, Any]
    update: dict[str, Any]
    destroy: list[str]


def parse_set(ctx: Context, args: Args, type_: str) -> SetRequest:
    account_id = ctx.account(args)
    create = args.obj("create") or {}
    update = args.obj("update") or {}
    destroy = args.string_list("destroy") or []
    total = len(create) + len(update) + len(destroy)
    if total > ctx.limits.max_objects_in_set:
        raise MethodError("requestTooLarge", f"{total} objects to create, update or destroy; maxObjectsInSet "
                          f"is {ctx.limits.max_objects_in_set}.")
    state = ctx.store.state(account_id, type_)
    if_in_state = args.string("ifInState")
    if if_in_state is not None and if_in_state != state:
        raise MethodError("stateMismatch",
                          f"ifInState is {if_in_state!r} but the {type_} state is {state!r}.")
    return SetRequest(account_id, state, create, update, destroy)


def set_error(type_: str, description: str, **extra: Any) -> dict[str, Any]:
    """An RFC 8620 §5.3 SetError object."""
    return {"type": type_, "description": description, **extra}


def invalid_properties(properties: list[str], description: str) -> dict[str, Any]:
    return set_error("invalidProperties", description, properties=properties)


@dataclass
class SetResult:
    created: dict[str, Any] = field(default_factory=dict)
    updated: dict[str, Any] = field(default_factory=dict)
    destroyed: list[str] = field(default_factory=list)
    not_created: dict[str, Any] = field(default_factory=dict)
    not_updated: dict[str, Any] = field(default_factory=dict)
    not_destroyed: dict[str, Any] = field(default_factory=dict)

    def response(self, account_id: str, old_state: str, new_state: str) -> dict[str, Any]:
        # RFC 8620 §5.3: each map or list is null when empty.
        return {
            "accountId": account_id, "oldState": old_state, "newState": new_state,
            "created": self.created or None, "updated": self.updated or None,
            "destroyed": self.destroyed or None, "notCreated": self.not_created or None,
            "notUpdated": self.not_updated or None, "notDestroyed": self.not_destroyed or None,
        }


class PatchError(ValueError):
    pass


def patch_paths(patch: dict[str, Any]) -> list[tuple[list[str], Any]]:
    """RFC 8620 §5.3 PatchObject: JSON Pointer paths (without the leading `/`) -> value; no path may be a
    prefix of another."""
    parsed: list[tuple[list[str], Any]] = []
    for path, value in patch.items():
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")]
        if any(not t for t in tokens):
            raise PatchError(f"{path!r} is not a valid patch path")
        parsed.append((tokens, value))
    # In sorted order a path's extensions follow it directly, so comparing neighbours finds every conflict:
    # O(n log n) rather than comparing every pair, which a patch of many thousands of paths would make costly.
    ordered = sorted(tokens for tokens, _ in parsed)
    for a, b in itertools.pairwise(ordered):
        if len(a) < len(b) and b[:len(a)] == a:
            raise PatchError(f"the patch sets both {'/'.join(a)!r} and a path below it")
    return parsed


# --- /query (RFC 8620 §5.5) --------------------------------------------------------------------------------

QUERY_ARGS = ("accountId", "filter", "sort", "position", "anchor", "anchorOffset", "limit", "calculateTotal")


@dataclass
class Page:
    ids: list[str]
    position: int
    clamped_limit: int | None


def paginate(ids: list[str], args: Args, max_limit: int) -> Page:
    """RFC 8620 §5.5 windowing: position (negative: from the end) or anchor + anchorOffset, and limit."""
    position = args.integer("position", 0)
    anchor = args.string("anchor")
    anchor_offset = args.integer("anchorOffset", 0)
    limit = args.integer("limit", None, minimum=0)
    assert position is not None and anchor_offset is not None
    clamped: int | None = None
    if limit is None or limit > max_limit:
        # The server caps the limit and says so in the response.
        limit = clamped = max_limit
    if anchor is not None:
        try:
            index = ids.index(anchor)
        except ValueError:
            raise MethodError("anchorNotFound", f"The anchor {anchor!r} is not in the results.") from None
        start = max(0, index + anchor_offset)
    else:
        start = position if position >= 0 else max(0, len(ids) + position)
    return Page(ids[start:start + limit], min(start, len(ids)), clamped)


def query_response(account_id: str, query_state: str, page: Page, total: int | None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "accountId": account_id, "queryState": query_state, "canCalculateChanges": False,
        "position": page.position, "ids": page.ids,
    }
    if total is not None:
        response["total"] = total
    if page.clamped_limit is not None:
        response["limit"] = page.clamped_limit
    return response


def query_changes_unsupported(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    """RFC 8620 §5.6: a server may always answer /queryChanges with cannotCalculateChanges."""
    args = Args(raw, ("accountId", "filter", "sort", "sinceQueryState", "maxChanges", "upToId",
                      "calculateTotal", "collapseThreads"))
    ctx.account(args)
    raise MethodError("cannotCalculateChanges",
                      "This server does not keep query states; run the query again.")


def walk_filter(filter_: Any, leaf: Callable[[dict[str, Any]], Any],
                combine: Callable[[str, list[Any]], Any]) -> Any:
    """Fold an RFC 8620 §5.5 FilterOperator/FilterCondition tree: `leaf` maps conditions, `combine`
    operators."""
    if not isinstance(filter_, dict):
        raise invalid("A filter must be an object.")
    if "operator" in filter_:
        operator, conditions = filter_.get("operator"), filter_.get("conditions")
        if set(filter_) - {"operator", "conditions"}:
            raise invalid("A FilterOperator has only operator and conditions.")
        if operator not in ("AND", "OR", "NOT") or not isinstance(conditions, list):
            raise invalid("A FilterOperator needs operator AND, OR or NOT and a list of conditions.")
        return combine(operator, [walk_filter(c, leaf, combine) for c in conditions])
    return leaf(filter_)


def sort_comparators(args: Args, allowed: Iterable[str]) -> list[dict[str, Any]]:
    """The `sort` argument: a list of Comparator objects on supported properties (else unsupportedSort)."""
    value = args.value("sort")
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("The argument sort must be a list of Comparator objects.")
    known = set(allowed)
    out: list[dict[str, Any]] = []
    for c in value:
        if not isinstance(c, dict) or not isinstance(c.get("property"), str):
            raise invalid("Each comparator needs a property.")
        extra = set(c) - {"property", "isAscending", "collation", "keyword"}
        if extra:
            raise invalid(f"Unknown comparator fields: {', '.join(sorted(extra))}.")
        if not isinstance(c.get("isAscending", True), bool):
            raise invalid("isAscending must be a boolean.")
        if c["property"] not in known:
            raise MethodError("unsupportedSort", f"Sorting by {c['property']!r} is not supported.")
        collation = c.get("collation")
        if collation is not None and collation not in COLLATIONS:
            raise MethodError("unsupportedSort", f"The collation {collation!r} is not supported.")
        out.append(c)
    return out


# RFC 8620 §5.5 / RFC 4790: the collations this server compares strings with (all case-insensitive here).
COLLATIONS = ("i;ascii-casemap", "i;unicode-casemap", "i;ascii-numeric")
