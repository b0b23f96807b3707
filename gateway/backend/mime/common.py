"""What parsing and composing messages share: RFC 3339 dates, the `header:` property grammar of RFC 8621
§4.1.3 and the stdlib parser. Pure functions; no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import Message
from email.parser import BytesParser

# --- dates (RFC 8620 §1.4: Date and UTCDate are RFC 3339 date-times) -------------------------------------

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def format_utc(ts: int) -> str:
    """UTCDate: `2014-10-30T14:12:00Z`."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_date(dt: datetime) -> str:
    """Date: RFC 3339 with the message's own offset (`-0000`, "no zone known", becomes `Z`)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    text = dt.replace(microsecond=0).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def parse_date(value: object, *, utc: bool) -> datetime | None:
    """Parse an RFC 3339 Date (or a UTCDate, whose zone must be `Z`); None if it is not one."""
    if not isinstance(value, str) or not _RFC3339.match(value):
        return None
    if utc and not value.endswith("Z"):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


# --- `header:` properties and the forms allowed per field (RFC 8621 §4.1.2, §4.1.3) ---------------------

FORMS = ("Raw", "Text", "Addresses", "GroupedAddresses", "MessageIds", "Date", "URLs")

# RFC 8621 §4.1.2: the forms allowed for header fields defined in RFC 5322 or RFC 2369; any other field may be
# fetched in every form.
_FORM_FIELDS: dict[str, frozenset[str]] = {
    "Text": frozenset({"subject", "comments", "keywords", "list-id"}),
    "Addresses": frozenset({"from", "sender", "reply-to", "to", "cc", "bcc", "resent-from", "resent-sender",
                            "resent-reply-to", "resent-to", "resent-cc", "resent-bcc"}),
    "MessageIds": frozenset({"message-id", "in-reply-to", "references", "resent-message-id"}),
    "Date": frozenset({"date", "resent-date"}),
    "URLs": frozenset({"list-help", "list-unsubscribe", "list-subscribe", "list-post", "list-owner",
                       "list-archive"}),
}
_FORM_FIELDS["GroupedAddresses"] = _FORM_FIELDS["Addresses"]
_KNOWN_FIELDS = frozenset().union(*_FORM_FIELDS.values(), {"return-path", "received"})


@dataclass(frozen=True)
class HeaderProperty:
    """A parsed `header:{name}[:as{Form}][:all]` property name."""

    name: str
    form: str
    all: bool

    @property
    def key(self) -> str:
        return self.name.lower()


def parse_header_property(prop: str) -> HeaderProperty | None:
    """None when `prop` is not a `header:` property; ValueError when it is one but malformed or forbidden."""
    if not prop.startswith("header:"):
        return None
    pieces = prop[7:].split(":")
    name = pieces[0]
    if not name or any(not 33 <= ord(c) <= 126 for c in name):
        raise ValueError(f"{prop!r} does not name a header field")
    form, all_, i = "Raw", False, 1
    if i < len(pieces) and pieces[i].startswith("as"):
        form = pieces[i][2:]
        if form not in FORMS:
            raise ValueError(f"{prop!r} asks for the unknown form {form!r}")
        i += 1
    if i < len(pieces) and pieces[i] == "all":
        all_, i = True, i + 1
    if i != len(pieces):
        raise ValueError(f"{prop!r} is not header:{{name}}[:as{{Form}}][:all]")
    lname = name.lower()
    # RFC 8621 §4.1.2: fetching a forbidden form (e.g. header:From:asDate) is invalidArguments.
    if form != "Raw" and lname in _KNOWN_FIELDS and lname not in _FORM_FIELDS[form]:
        raise ValueError(f"the {form} form is not allowed for the {name} header field")
    return HeaderProperty(name, form, all_)


# --- the stdlib parser --------------------------------------------------------------------------------------

_PARSER = BytesParser(policy=policy.default)


def parse_bytes(raw: bytes) -> Message:
    return _PARSER.parsebytes(raw)
