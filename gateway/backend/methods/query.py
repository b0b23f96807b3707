"""Email/query filters and sorts (RFC 8621 §4.4) compiled to SQL over the store's `emails` table (alias `e`).

Pure translation: values become bound parameters, never SQL text. No I/O here.
"""

from __future__ import annotations

from typing import Any

from gateway.backend.methods.common import Context, invalid, walk_filter
from gateway.backend.mime.common import parse_date
from gateway.errors import MethodError

# RFC 8621 §4.4.2: the sort properties offered (and advertised as emailQuerySortOptions).
SORT_OPTIONS = ("receivedAt", "sentAt", "size", "from", "to", "subject", "hasKeyword",
                "allInThreadHaveKeyword", "someInThreadHaveKeyword")

_KEYWORD_FORBIDDEN = frozenset('(){]%*"\\')


def valid_keyword(keyword: object) -> bool:
    """RFC 8621 §4.1.1: 1-255 printable ASCII characters except ( ) { ] % * " \\."""
    return (isinstance(keyword, str) and 0 < len(keyword) <= 255
            and all(33 <= ord(c) <= 126 and c not in _KEYWORD_FORBIDDEN for c in keyword))


_HAS_KEYWORD = "EXISTS (SELECT 1 FROM json_each(e.keywords) k WHERE k.key=?)"
_SOME_IN_THREAD = ("EXISTS (SELECT 1 FROM emails t, json_each(t.keywords) k WHERE t.account_id=e.account_id "
                   "AND t.thread_id=e.thread_id AND k.key=?)")
_ALL_IN_THREAD = ("NOT EXISTS (SELECT 1 FROM emails t WHERE t.account_id=e.account_id "
                  "AND t.thread_id=e.thread_id "
                  "AND NOT EXISTS (SELECT 1 FROM json_each(t.keywords) k WHERE k.key=?))")
_IN_MAILBOX = ("EXISTS (SELECT 1 FROM email_mailboxes em WHERE em.account_id=e.account_id "
               "AND em.email_id=e.id AND em.mailbox_id=?)")
_HEADER = ("EXISTS (SELECT 1 FROM json_each(e.meta, '$.headers') h "
           "WHERE lower(json_extract(h.value, '$.name'))=? "
           "AND (? IS NULL OR instr(jmap_fold(json_extract(h.value, '$.value')), ?) > 0))")

_TEXT_COLUMNS = {"from": ("e.s_from",), "to": ("e.s_to",), "cc": ("e.s_cc",), "bcc": ("e.s_bcc",),
                 "subject": ("e.s_subject",), "body": ("e.s_body",),
                 "text": ("e.s_subject", "e.s_from", "e.s_to", "e.s_cc", "e.s_bcc", "e.s_body")}
_KEYWORD_CONDITIONS = {"hasKeyword": _HAS_KEYWORD, "notKeyword": "NOT " + _HAS_KEYWORD,
                       "someInThreadHaveKeyword": _SOME_IN_THREAD,
                       "noneInThreadHaveKeyword": "NOT " + _SOME_IN_THREAD,
                       "allInThreadHaveKeyword": _ALL_IN_THREAD}
CONDITIONS = frozenset({"inMailbox", "inMailboxOtherThan", "before", "after", "minSize", "maxSize",
                        "hasAttachment", "header", *_TEXT_COLUMNS, *_KEYWORD_CONDITIONS})

Sql = tuple[str, list[Any]]


def _keyword(name: str, value: Any) -> str:
    if not valid_keyword(value):
        raise invalid(f"The filter property {name} must be a keyword (RFC 8621 §4.1.1).")
    return str(value).lower()


def _uint(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise invalid(f"The filter property {name} must be an unsigned integer.")
    return value


def _condition(cond: dict[str, Any], ctx: Context) -> Sql:
    unknown = set(cond) - CONDITIONS
    if unknown:
        raise MethodError("unsupportedFilter",
                          f"Unknown Email filter properties: {', '.join(sorted(unknown))}.")
    clauses: list[str] = []
    params: list[Any] = []
    for name, value in cond.items():
        if name == "inMailbox":
            if not isinstance(value, str):
                raise invalid("The filter property inMailbox must be a mailbox id.")
            clauses.append(_IN_MAILBOX)
            params.append(ctx.resolve_id(value) or "")
        elif name == "inMailboxOtherThan":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise invalid("The filter property inMailboxOtherThan must be a list of mailbox ids.")
            ids = [ctx.resolve_id(v) or "" for v in value]
            marks = ",".join("?" * len(ids))
            clauses.append("EXISTS (SELECT 1 FROM email_mailboxes em WHERE em.account_id=e.account_id "
                           f"AND em.email_id=e.id AND em.mailbox_id NOT IN ({marks}))")
            params.extend(ids)
        elif name in ("before", "after"):
            dt = parse_date(value, utc=True)
            if dt is None:
                raise invalid(f"The filter property {name} must be a UTCDate such as 2024-01-31T12:00:00Z.")
            # RFC 8621 §4.4.1: before is strictly earlier, after is the same time or later.
            clauses.append("e.received_at < ?" if name == "before" else "e.received_at >= ?")
            params.append(dt.timestamp())
        elif name == "minSize":
            clauses.append("e.size >= ?")
            params.append(_uint(name, value))
        elif name == "maxSize":
            clauses.append("e.size < ?")
            params.append(_uint(name, value))
        elif name == "hasAttachment":
            if not isinstance(value, bool):
                raise invalid("The filter property hasAttachment must be a boolean.")
            clauses.append("e.has_attachment = ?")
            params.append(int(value))
        elif name in _KEYWORD_CONDITIONS:
            clauses.append(_KEYWORD_CONDITIONS[name])
            params.append(_keyword(name, value))
        elif name in _TEXT_COLUMNS:
            if not isinstance(value, str):
                raise invalid(f"The filter property {name} must be a string.")
            needle = value.casefold()
            columns = _TEXT_COLUMNS[name]
            clauses.append("(" + " OR ".join(f"instr({c}, ?) > 0" for c in columns) + ")")
            params.extend([needle] * len(columns))
        else:  # header
            if not isinstance(value, list) or not 1 <= len(value) <= 2 or \
                    not all(isinstance(v, str) for v in value):
                raise invalid("The filter property header must be [name] or [name, text].")
            text = value[1].casefold() if len(value) == 2 else None
            clauses.append(_HEADER)
            params.extend([value[0].lower(), text, text])
    return ("(" + " AND ".join(clauses) + ")" if clauses else "1"), params


def _combine(operator: str, parts: list[Sql]) -> Sql:
    params = [p for _, ps in parts for p in ps]
    if not parts:
        # An empty AND matches everything; an empty OR nothing; NOT of nothing everything.
        return ("0" if operator == "OR" else "1"), []
    if operator == "NOT":
        # RFC 8620 §5.5: NOT matches when none of the conditions match.
        return "NOT (" + " OR ".join(sql for sql, _ in parts) + ")", params
    return "(" + f" {operator} ".join(sql for sql, _ in parts) + ")", params


def compile_filter(filter_: Any, ctx: Context) -> Sql:
    if filter_ is None:
        return "1", []
    result: Sql = walk_filter(filter_, lambda c: _condition(c, ctx), _combine)
    return result


_SORT_COLUMNS = {"receivedAt": "e.received_at", "sentAt": "e.sent_at", "size": "e.size",
                 "from": "e.from_sort", "to": "e.to_sort", "subject": "e.subject_sort"}
_SORT_KEYWORD = {"hasKeyword": _HAS_KEYWORD, "someInThreadHaveKeyword": _SOME_IN_THREAD,
                 "allInThreadHaveKeyword": _ALL_IN_THREAD}


def compile_sort(comparators: list[dict[str, Any]]) -> Sql:
    """ORDER BY for the comparators; ties end in arrival order so paging is stable. Default: newest first."""
    if not comparators:
        comparators = [{"property": "receivedAt", "isAscending": False}]
    terms: list[str] = []
    params: list[Any] = []
    for c in comparators:
        direction = "ASC" if c.get("isAscending", True) else "DESC"
        prop = c["property"]
        if prop in _SORT_KEYWORD:
            keyword = c.get("keyword")
            if not valid_keyword(keyword):
                raise invalid(f"Sorting by {prop} needs a keyword.")
            terms.append(f"{_SORT_KEYWORD[prop]} {direction}")
            params.append(str(keyword).lower())
        else:
            terms.append(f"{_SORT_COLUMNS[prop]} {direction}")
    first = "ASC" if comparators[0].get("isAscending", True) else "DESC"
    terms.append(f"e.rowid {first}")
    return ", ".join(terms), params
