"""RFC 5322/MIME messages <-> RFC 8621 Email properties: parsing, header forms, body flattening, composing.

Pure functions on bytes and plain data (stdlib `email`, policy=default); no database, no clock of its own
(callers pass `now`), no I/O.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address, Group
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from email.utils import format_datetime, parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any, cast

_PARSER = BytesParser(policy=policy.default)
# Composed messages are 7-bit clean (quoted-printable/base64 bodies, RFC 2047 headers) with CRLF line ends,
# so they can be relayed anywhere without 8BITMIME.
_COMPOSE_POLICY = policy.SMTP.clone(cte_type="7bit")

PREVIEW_LENGTH = 256  # RFC 8621 §4.1.4: preview is at most 256 characters
SEARCH_TEXT_LIMIT = 256 * 1024  # characters of body text kept for the `text`/`body` filters

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


# --- header fields and their parsed forms (RFC 8621 §4.1.2, §4.1.3) ---------------------------------------

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


_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _unfold(raw: str) -> str:
    return _FOLD.sub("", raw)


def _as_text(unfolded: str) -> str:
    try:
        text = str(policy.default.header_factory("x-jmap-text", unfolded))
    except Exception:  # the stdlib parser raises assorted errors on hostile input; fall back to the raw text
        text = unfolded
    return unicodedata.normalize("NFC", text.strip())


def _address(a: Address) -> dict[str, str | None]:
    return {"name": a.display_name or None, "email": a.addr_spec}


def _groups(unfolded: str) -> list[Group]:
    try:
        header = policy.default.header_factory("to", unfolded)
        return list(getattr(header, "groups", ()))
    except Exception:  # best effort on invalid address lists (RFC 8621 §4.1.2.3)
        return []


def _as_addresses(unfolded: str) -> list[dict[str, str | None]]:
    return [_address(a) for g in _groups(unfolded) for a in g.addresses]


def _as_grouped(unfolded: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for g in _groups(unfolded):
        addresses = [_address(a) for a in g.addresses]
        # RFC 8621 §4.1.2.4: consecutive addresses outside a group share one group with a null name.
        if g.display_name is None and out and out[-1]["name"] is None:
            out[-1]["addresses"].extend(addresses)
        else:
            out.append({"name": g.display_name, "addresses": addresses})
    return out


_ANGLE = re.compile(r"<([^<>]*)>")


def _as_message_ids(unfolded: str) -> list[str] | None:
    ids = ["".join(m.split()) for m in _ANGLE.findall(unfolded)]
    ids = [i for i in ids if i]
    if ids:
        return ids
    bare = unfolded.strip()
    # Lenient: some mailers write a lone id without angle brackets.
    return [bare] if bare and "@" in bare and not any(c.isspace() for c in bare) else None


def _as_date(unfolded: str) -> str | None:
    try:
        return format_date(parsedate_to_datetime(unfolded.strip()))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _as_urls(unfolded: str) -> list[str] | None:
    urls = ["".join(m.split()) for m in _ANGLE.findall(unfolded)]
    return [u for u in urls if u] or None


def header_form(raw: str, form: str) -> Any:
    """One raw header value (the text after the colon) in the given RFC 8621 §4.1.2 form."""
    if form == "Raw":
        return raw
    unfolded = _unfold(raw)
    if form == "Text":
        return _as_text(unfolded)
    if form == "Addresses":
        return _as_addresses(unfolded)
    if form == "GroupedAddresses":
        return _as_grouped(unfolded)
    if form == "MessageIds":
        return _as_message_ids(unfolded)
    if form == "Date":
        return _as_date(unfolded)
    return _as_urls(unfolded)


def header_value(headers: Sequence[Mapping[str, str]], prop: HeaderProperty) -> Any:
    """RFC 8621 §4.1.3: the last instance (or all, in order) of a header field, in the asked form."""
    values = [header_form(h["value"], prop.form) for h in headers if h["name"].lower() == prop.key]
    if prop.all:
        return values
    return values[-1] if values else None


def split_header_section(raw: bytes) -> list[dict[str, str]]:
    """The message's header fields as RFC 8621 EmailHeader objects: `value` is the Raw form, i.e. every octet
    after the colon up to (not including) the terminating CRLF, folds kept, invalid UTF-8 replaced."""
    fields: list[tuple[bytes, bytearray]] = []
    pos, n = 0, len(raw)
    while pos < n:
        end = raw.find(b"\n", pos)
        stop = n if end < 0 else end + 1
        line = raw[pos:stop]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].extend(line)
        elif pos == 0 and line.startswith(b"From "):
            pass  # an mbox separator line, not a header field
        else:
            name, sep, value = line.partition(b":")
            name = name.rstrip(b" \t")
            if not sep or not name or any(c <= 32 or c > 126 for c in name):
                break  # not a header field: the stdlib parser starts the body here too
            fields.append((name, bytearray(value)))
        pos = stop
    return [{"name": name.decode("ascii"), "value": bytes(value).rstrip(b"\r\n").decode("utf-8", "replace")}
            for name, value in fields]


# --- body structure (RFC 8621 §4.1.4) ---------------------------------------------------------------------

def _raw_headers_of(part: Message) -> list[dict[str, str]]:
    # The stdlib keeps each value with its folds but without the space after the colon; put one back so the
    # value reads like the Raw form.
    return [{"name": k, "value": " " + str(v)} for k, v in part.raw_items()]


# With policy=default every header read builds a parsed header object, so each part's type is read once and
# passed along rather than asked for again.

def _leaf_bytes(part: Message, content_type: str) -> bytes:
    if content_type.startswith("message/") and part.is_multipart():
        inner = part.get_payload(0)
        return cast(Message, inner).as_bytes(policy=policy.SMTP)
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    return b""


def _is_container(part: Message, content_type: str) -> bool:
    return content_type.startswith("multipart/") and isinstance(part.get_payload(), list)


def iter_leaves(message: Message) -> Iterator[tuple[Message, str]]:
    """(part, content type) of the leaf parts, in the order their partIds ("1", "2", ...) are assigned."""
    content_type = message.get_content_type()
    if _is_container(message, content_type):
        for sub in cast(list[Message], message.get_payload()):
            yield from iter_leaves(sub)
    else:
        yield message, content_type


def _charset(part: Message, content_type: str) -> str | None:
    # RFC 8621 §4.1.4 `charset`: the parameter for text/*, us-ascii when implicit, null for other types.
    if content_type.startswith("text/"):
        return part.get_content_charset() or "us-ascii"
    if "Content-Type" not in part and content_type != "message/rfc822":
        return "us-ascii"
    return None


def _optional_str(part: Message, name: str) -> str | None:
    if name not in part:  # a cheap scan of the raw names; parsing only what is there
        return None
    try:
        value = part.get(name)
    except Exception:  # a header the stdlib cannot parse is treated as absent
        return None
    return str(value).strip() if value is not None else None


def _structure(part: Message, blob_id: str, leaves: list[Message], headers: list[dict[str, str]] | None
               ) -> dict[str, Any]:
    content_type = part.get_content_type()
    node: dict[str, Any] = {
        "partId": None, "blobId": None, "size": 0,
        "headers": headers if headers is not None else _raw_headers_of(part),
        "name": None, "type": content_type, "charset": _charset(part, content_type),
        "disposition": part.get_content_disposition() if "Content-Disposition" in part else None,
        "cid": None, "language": None, "location": None,
    }
    try:
        node["name"] = part.get_filename()
    except Exception:  # malformed RFC 2231 parameters: no name rather than no message
        node["name"] = None
    cid = _optional_str(part, "Content-ID")
    if cid:
        node["cid"] = cid[1:-1] if cid.startswith("<") and cid.endswith(">") else cid
    language = _optional_str(part, "Content-Language")
    if language:
        node["language"] = [t.strip() for t in language.split(",") if t.strip()]
    node["location"] = _optional_str(part, "Content-Location")
    if _is_container(part, content_type):
        node["subParts"] = [_structure(p, blob_id, leaves, None)
                            for p in cast(list[Message], part.get_payload())]
    else:
        leaves.append(part)
        node["partId"] = str(len(leaves))
        node["blobId"] = part_blob_id(blob_id, node["partId"])
        node["size"] = len(_leaf_bytes(part, content_type))
    return node


def _inline_media(type_: str) -> bool:
    return type_.startswith(("image/", "audio/", "video/"))


def _flatten(parts: list[dict[str, Any]], multipart_type: str, in_alternative: bool,
             html: list[dict[str, Any]] | None, text: list[dict[str, Any]] | None,
             attachments: list[dict[str, Any]]) -> None:
    """RFC 8621 §4.1.4's parseStructure algorithm: which leaves are text body, HTML body, attachments."""
    text_len = len(text) if text is not None else -1
    html_len = len(html) if html is not None else -1
    for i, part in enumerate(parts):
        type_ = part["type"]
        is_inline = (part["disposition"] != "attachment"
                     and (type_ in ("text/plain", "text/html") or _inline_media(type_))
                     and (i == 0 or (multipart_type != "related"
                                     and (_inline_media(type_) or not part["name"]))))
        if "subParts" in part:
            sub_type = type_.split("/", 1)[1]
            _flatten(part["subParts"], sub_type, in_alternative or sub_type == "alternative",
                     html, text, attachments)
        elif is_inline:
            if multipart_type == "alternative":
                if type_ == "text/plain" and text is not None:
                    text.append(part)
                elif type_ == "text/html" and html is not None:
                    html.append(part)
                else:
                    attachments.append(part)
                continue
            if in_alternative:
                if type_ == "text/plain":
                    html = None
                if type_ == "text/html":
                    text = None
            if text is not None:
                text.append(part)
            if html is not None:
                html.append(part)
            if (text is None or html is None) and _inline_media(type_):
                attachments.append(part)
        else:
            attachments.append(part)
    if multipart_type == "alternative" and text is not None and html is not None:
        # Only an HTML part was found: the text body shows it too, and vice versa.
        if text_len == len(text) and html_len != len(html):
            text.extend(html[html_len:])
        if html_len == len(html) and text_len != len(text):
            html.extend(text[text_len:])


def part_blob_id(message_blob_id: str, part_id: str) -> str:
    """A leaf part's blobId: the message's blobId and the partId (an Id, RFC 8620 §1.2 charset)."""
    return f"{message_blob_id}_{part_id}"


def message_blob_id(raw: bytes) -> str:
    """Blobs are content-addressed: equal bytes delivered to many accounts are stored once."""
    return "G" + hashlib.sha256(raw).hexdigest()


# --- text extraction ----------------------------------------------------------------------------------------

class _HtmlText(HTMLParser):
    _SKIP = frozenset({"script", "style", "head", "title"})
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
                        "pre", "table", "ul", "ol", "hr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.out.append(data)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # HTMLParser is lenient, but never let markup break a delivery
        pass
    return "".join(parser.out)


def decode_text(payload: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode a text part; the flag is RFC 8621's `isEncodingProblem` (unknown charset, malformed octets)."""
    name = (charset or "us-ascii").strip().lower()
    try:
        name = codecs.lookup(name).name
        return payload.decode(name), False
    except LookupError:  # unknown charset, or a codec that is no text encoding (rot13, zlib, ...)
        return payload.decode("utf-8", "replace"), True
    except UnicodeDecodeError:
        if name == "ascii":
            # Mislabelled 8-bit text is nearly always UTF-8; only call it a problem when that fails too.
            try:
                return payload.decode("utf-8"), False
            except UnicodeDecodeError:
                pass
        return payload.decode(name, "replace"), True


def leaf_text(part: Message, content_type: str) -> tuple[str, bool]:
    return decode_text(_leaf_bytes(part, content_type), part.get_content_charset())


# --- parsing ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedEmail:
    """Everything the store keeps about a message besides its bytes, computed once at delivery."""

    blob_id: str
    size: int
    properties: dict[str, Any]  # RFC 8621 immutable Email properties, as returned by Email/get
    sent_ts: int | None  # sentAt as a UNIX time, for sorting
    message_ids: list[str]  # Message-ID, In-Reply-To and References: what threading matches on
    body_text: str  # text of the body parts, for the `text` and `body` filters


def parse_bytes(raw: bytes) -> Message:
    return _PARSER.parsebytes(raw)


def _addresses_text(addresses: list[dict[str, str | None]] | None) -> str:
    if not addresses:
        return ""
    return " ".join(f"{a['name'] or ''} {a['email']}".strip() for a in addresses)


def parse_message(raw: bytes) -> ParsedEmail:
    """Parse an RFC 5322 message into the immutable RFC 8621 Email properties (never raises on bad input)."""
    blob_id = message_blob_id(raw)
    message = parse_bytes(raw)
    headers = split_header_section(raw)

    def last(name: str, form: str) -> Any:
        return header_value(headers, HeaderProperty(name, form, False))

    leaf_parts: list[Message] = []
    structure = _structure(message, blob_id, leaf_parts, headers)
    text: list[dict[str, Any]] = []
    html: list[dict[str, Any]] = []
    attachments: list[dict[str, Any]] = []
    _flatten([structure], "mixed", False, html, text, attachments)

    leaves = {str(i): p for i, p in enumerate(leaf_parts, start=1)}
    bodies: list[str] = []
    for part in text:
        if part["type"].startswith("text/"):
            content, _ = leaf_text(leaves[part["partId"]], part["type"])
            bodies.append(html_to_text(content) if part["type"] == "text/html" else content)
    body_text = "\n".join(bodies)
    preview = " ".join(body_text.split())[:PREVIEW_LENGTH]
    if not text:  # an HTML-only or attachment-only message: take the words from the HTML body if any
        for part in html:
            if part["type"] == "text/html":
                body_text += "\n" + html_to_text(leaf_text(leaves[part["partId"]], part["type"])[0])
        preview = " ".join(body_text.split())[:PREVIEW_LENGTH]

    sent_at = last("Date", "Date")
    sent_dt = parse_date(sent_at, utc=False) if sent_at else None
    message_id = last("Message-ID", "MessageIds")
    in_reply_to = last("In-Reply-To", "MessageIds")
    references = last("References", "MessageIds")
    properties: dict[str, Any] = {
        "headers": headers,
        "messageId": message_id,
        "inReplyTo": in_reply_to,
        "references": references,
        "sender": last("Sender", "Addresses"),
        "from": last("From", "Addresses"),
        "to": last("To", "Addresses"),
        "cc": last("Cc", "Addresses"),
        "bcc": last("Bcc", "Addresses"),
        "replyTo": last("Reply-To", "Addresses"),
        "subject": last("Subject", "Text"),
        "sentAt": sent_at,
        "bodyStructure": structure,
        "textBody": [p["partId"] for p in text],
        "htmlBody": [p["partId"] for p in html],
        "attachments": [p["partId"] for p in attachments],
        # RFC 8621 §4.1.4: true when an attachment is not marked inline.
        "hasAttachment": any(p["disposition"] != "inline" for p in attachments),
        "preview": preview,
    }
    ids: list[str] = []
    for group in (message_id, in_reply_to, references):
        ids.extend(group or ())
    return ParsedEmail(blob_id=blob_id, size=len(raw), properties=properties,
                       sent_ts=int(sent_dt.timestamp()) if sent_dt else None,
                       message_ids=list(dict.fromkeys(ids)), body_text=body_text[:SEARCH_TEXT_LIMIT])


def search_fields(p: ParsedEmail) -> dict[str, str]:
    """Case-folded text the Email/query filters match against (RFC 8621 §4.4.1)."""
    props = p.properties
    return {
        "s_subject": (props["subject"] or "").casefold(),
        "s_from": _addresses_text(props["from"]).casefold(),
        "s_to": _addresses_text(props["to"]).casefold(),
        "s_cc": _addresses_text(props["cc"]).casefold(),
        "s_bcc": _addresses_text(props["bcc"]).casefold(),
        "s_body": p.body_text.casefold(),
    }


_SUBJECT_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|vs)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


def base_subject(subject: str | None) -> str:
    """The subject sort key: without reply/forward prefixes (RFC 5256 §2.1 in spirit), case-folded."""
    return _SUBJECT_PREFIX.sub("", subject or "").strip().casefold()


def address_sort_key(addresses: list[dict[str, str | None]] | None) -> str:
    """RFC 8621 §4.4.2 `from`/`to` sort: the first address's name, or its email when the name is empty."""
    if not addresses:
        return ""
    first = addresses[0]
    return (first["name"] or first["email"] or "").casefold()


def body_values(raw: bytes, part_ids: Sequence[str], max_bytes: int) -> dict[str, dict[str, Any]]:
    """RFC 8621 §4.1.4 EmailBodyValue objects for the text partIds, truncated to `max_bytes` (0 = all)."""
    wanted = set(part_ids)
    out: dict[str, dict[str, Any]] = {}
    for i, (part, content_type) in enumerate(iter_leaves(parse_bytes(raw)), start=1):
        pid = str(i)
        if pid not in wanted:
            continue
        value, problem = leaf_text(part, content_type)
        truncated = False
        if max_bytes and len(value.encode()) > max_bytes:
            # Truncate on a character boundary of the UTF-8 encoding, as RFC 8621 §4.2 asks.
            value = value.encode()[:max_bytes].decode("utf-8", "ignore")
            truncated = True
        out[pid] = {"value": value, "isEncodingProblem": problem, "isTruncated": truncated}
    return out


def leaf_content(raw: bytes, part_id: str) -> bytes | None:
    """The decoded octets of one leaf part (what its blobId downloads), None if there is no such part."""
    for i, (part, content_type) in enumerate(iter_leaves(parse_bytes(raw)), start=1):
        if str(i) == part_id:
            return _leaf_bytes(part, content_type)
    return None


# --- composing (Email/set create, RFC 8621 §4.6) ------------------------------------------------------------

class ComposeError(ValueError):
    """The create object cannot become a message: an `invalidProperties` SetError for `properties`."""

    def __init__(self, properties: list[str], description: str) -> None:
        super().__init__(description)
        self.properties = properties
        self.description = description


class MissingBlobs(LookupError):
    """Parts refer to blobs the account cannot see: a `blobNotFound` SetError."""

    def __init__(self, blob_ids: list[str]) -> None:
        super().__init__(", ".join(blob_ids))
        self.blob_ids = blob_ids


_ADDRESS_PROPS = {"sender": "Sender", "from": "From", "to": "To", "cc": "Cc", "bcc": "Bcc",
                  "replyTo": "Reply-To"}
_MSGID_PROPS = {"messageId": "Message-ID", "inReplyTo": "In-Reply-To", "references": "References"}
# The partId of the empty text/plain body given to a message created without any body (not a JSON-safe
# client partId in practice, and harmless if a client sends it: it is just another body value).
_EMPTY_PART = "\0empty"
_PART_KEYS = frozenset({"partId", "blobId", "size", "headers", "name", "type", "charset", "disposition",
                        "cid", "language", "location", "subParts"})


def _check_addresses(prop: str, value: Any) -> list[Address]:
    if not isinstance(value, list):
        raise ComposeError([prop], f"{prop} must be a list of EmailAddress objects")
    out: list[Address] = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("email"), str) or \
                not isinstance(item.get("name") or "", str) or set(item) - {"name", "email"}:
            raise ComposeError([prop], f"{prop} must be a list of {{name, email}} objects")
        try:
            out.append(Address(display_name=item.get("name") or "", addr_spec=item["email"]))
        except Exception:
            raise ComposeError([prop], f"{item['email']!r} in {prop} is not an email address") from None
    return out


def _check_ids(prop: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or \
            not all(isinstance(i, str) and i and not _has_angle_or_space(i) for i in value):
        raise ComposeError([prop], f"{prop} must be a non-empty list of message ids without angle brackets")
    return value


def _has_angle_or_space(s: str) -> bool:
    return any(c in "<> \t\r\n" for c in s)


def _header_from_form(prop: str, hp: HeaderProperty, value: Any) -> list[tuple[str, Any, bool]]:
    """(name, value, raw) header instances for a `header:` create property."""
    values = value if hp.all else [value]
    if hp.all and not isinstance(value, list):
        raise ComposeError([prop], f"{prop} must be a list (it ends in :all)")
    out: list[tuple[str, Any, bool]] = []
    for v in values:
        if v is None:
            continue
        if hp.form == "Raw":
            if not isinstance(v, str):
                raise ComposeError([prop], f"{prop} must be a string")
            out.append((hp.name, v, True))
        elif hp.form == "Text":
            if not isinstance(v, str):
                raise ComposeError([prop], f"{prop} must be a string")
            out.append((hp.name, v, False))
        elif hp.form == "Addresses":
            out.append((hp.name, tuple(_check_addresses(prop, v)), False))
        elif hp.form == "GroupedAddresses":
            if not isinstance(v, list):
                raise ComposeError([prop], f"{prop} must be a list of EmailAddressGroup objects")
            groups: list[Address | Group] = []
            for g in v:
                if not isinstance(g, dict) or "addresses" not in g:
                    raise ComposeError([prop], f"{prop} must be a list of EmailAddressGroup objects")
                members = _check_addresses(prop, g["addresses"])
                if g.get("name") is None:
                    groups.extend(members)
                else:
                    groups.append(Group(str(g["name"]), members))
            out.append((hp.name, tuple(groups), False))
        elif hp.form == "MessageIds":
            out.append((hp.name, " ".join(f"<{i}>" for i in _check_ids(prop, v)), False))
        elif hp.form == "Date":
            dt = parse_date(v, utc=False)
            if dt is None:
                raise ComposeError([prop], f"{prop} must be an RFC 3339 date-time")
            out.append((hp.name, format_datetime(dt), False))
        else:  # URLs
            if not isinstance(v, list) or not all(isinstance(u, str) for u in v):
                raise ComposeError([prop], f"{prop} must be a list of URLs")
            out.append((hp.name, ", ".join(f"<{u}>" for u in v), False))
    return out


def _set_header(msg: Message, name: str, value: Any, raw: bool) -> None:
    if raw:
        msg.set_raw(name, value.lstrip(" "))
    else:
        msg[name] = value


def _part_headers(path: str, part: Mapping[str, Any]) -> list[tuple[str, Any, bool]]:
    out: list[tuple[str, Any, bool]] = []
    for key, value in part.items():
        if key == "headers":
            if not isinstance(value, list) or not all(
                    isinstance(h, dict) and isinstance(h.get("name"), str) and isinstance(h.get("value"), str)
                    for h in value):
                raise ComposeError([path], "headers must be a list of {name, value} objects")
            out.extend((h["name"], h["value"], True) for h in value)
        elif key.startswith("header:"):
            try:
                hp = parse_header_property(key)
            except ValueError as exc:
                raise ComposeError([path], str(exc)) from None
            assert hp is not None
            out.extend(_header_from_form(path, hp, value))
    for name, _, _ in out:
        if name.lower() in ("content-type", "content-transfer-encoding"):
            # RFC 8621 §4.6: these come from the part's type and the server's choice of encoding.
            raise ComposeError([path], f"{name} may not be given as a header of a body part")
    return out


def _build_part(path: str, part: Any, body_values: Mapping[str, str],
                fetch_blob: Callable[[str], bytes | None], missing: list[str]) -> MIMEPart:
    if not isinstance(part, dict):
        raise ComposeError([path], "a body part must be an object")
    unknown = [k for k in part if k not in _PART_KEYS and not k.startswith("header:")]
    if unknown:
        raise ComposeError([path], f"unknown body part properties: {', '.join(sorted(unknown))}")
    type_ = part.get("type")
    if type_ is not None and (not isinstance(type_, str) or "/" not in type_):
        raise ComposeError([path], "type must be a media type such as text/plain")
    extra_headers = _part_headers(path, part)
    node = MIMEPart(policy=_COMPOSE_POLICY)
    if "subParts" in part:
        subparts = part["subParts"]
        if not (type_ or "").lower().startswith("multipart/") or not isinstance(subparts, list):
            raise ComposeError([path], "subParts needs a multipart/* type and a list of parts")
        if part.get("partId") is not None or part.get("blobId") is not None:
            raise ComposeError([path], "a multipart part has neither partId nor blobId")
        node["Content-Type"] = str(type_).lower()
        for i, sub in enumerate(subparts):
            node.attach(_build_part(f"{path}/subParts/{i}", sub, body_values, fetch_blob, missing))
    else:
        part_id, blob_id = part.get("partId"), part.get("blobId")
        if (part_id is None) == (blob_id is None):
            raise ComposeError([path], "a body part needs exactly one of partId and blobId")
        disposition = part.get("disposition")
        name = part.get("name")
        cid = part.get("cid")
        for key, val in (("disposition", disposition), ("name", name), ("cid", cid),
                         ("location", part.get("location"))):
            if val is not None and not isinstance(val, str):
                raise ComposeError([path], f"{key} must be a string or null")
        params: dict[str, Any] = {}
        if disposition or name:
            params["disposition"] = disposition or "attachment"
        if name:
            params["filename"] = name
        if cid:
            params["cid"] = f"<{cid}>"
        if part_id is not None:
            if not isinstance(part_id, str) or part_id not in body_values:
                raise ComposeError([path], f"partId {part_id!r} is not in bodyValues")
            if part.get("charset") is not None:
                raise ComposeError([path], "charset may not be given with partId (the server picks UTF-8)")
            maintype, _, subtype = (type_ or "text/plain").lower().partition("/")
            if maintype != "text":
                raise ComposeError([path], "a part with partId must have a text/* type")
            node.set_content(body_values[part_id], subtype=subtype, charset="utf-8", **params)
        else:
            if not isinstance(blob_id, str):
                raise ComposeError([path], "blobId must be a string")
            data = fetch_blob(blob_id)
            if data is None:
                missing.append(blob_id)
                data = b""
            maintype, _, subtype = (type_ or "application/octet-stream").lower().partition("/")
            if maintype == "multipart":
                raise ComposeError([path], "a multipart part needs subParts")
            if maintype == "message" and subtype == "rfc822":
                node.set_content(parse_bytes(data), **params)
            else:
                node.set_content(data, maintype=maintype, subtype=subtype, **params)
                charset = part.get("charset")
                if isinstance(charset, str) and maintype == "text":
                    node.set_param("charset", charset)
        language = part.get("language")
        if language is not None:
            if not isinstance(language, list) or not all(isinstance(t, str) for t in language):
                raise ComposeError([path], "language must be a list of language tags")
            node["Content-Language"] = ", ".join(language)
        if part.get("location") is not None:
            node["Content-Location"] = part["location"]
    for hname, hvalue, raw in extra_headers:
        _set_header(node, hname, hvalue, raw)
    return node


def _single_body(prop: str, value: Any, media: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > 1:
        raise ComposeError([prop], f"{prop} must be a list of at most one part")
    if not value:
        return None
    part = value[0]
    if not isinstance(part, dict):
        raise ComposeError([prop], f"{prop} must be a list of body part objects")
    if part.get("type", media) != media:
        raise ComposeError([prop], f"the part in {prop} must be {media}")
    return {**part, "type": media}


def _structure_from_lists(create: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 8621 §4.6: build bodyStructure from textBody/htmlBody/attachments."""
    text = _single_body("textBody", create.get("textBody"), "text/plain")
    html = _single_body("htmlBody", create.get("htmlBody"), "text/html")
    attachments = create.get("attachments") or []
    if not isinstance(attachments, list):
        raise ComposeError(["attachments"], "attachments must be a list of body parts")
    inline = [a for a in attachments
              if isinstance(a, dict) and a.get("disposition") == "inline" and a.get("cid")]
    others = [a for a in attachments if not any(a is i for i in inline)]
    if html is not None and inline:
        html = {"type": "multipart/related", "subParts": [html, *inline]}
    else:
        others = attachments
    if text is not None and html is not None:
        body: dict[str, Any] | None = {"type": "multipart/alternative", "subParts": [text, html]}
    else:
        body = text or html
    if others:
        return {"type": "multipart/mixed", "subParts": ([body] if body else []) + others}
    if body is None:
        return {"partId": _EMPTY_PART, "type": "text/plain"}
    return body


def compose_message(create: Mapping[str, Any], *, fetch_blob: Callable[[str], bytes | None],
                    id_domain: str, now: datetime) -> bytes:
    """An RFC 5322 message (CRLF, 7-bit) from the header and body properties of an Email/set create."""
    values = create.get("bodyValues") or {}
    if not isinstance(values, dict):
        raise ComposeError(["bodyValues"], "bodyValues must be an object")
    body_values: dict[str, str] = {_EMPTY_PART: ""}
    for pid, bv in values.items():
        if not isinstance(bv, dict) or not isinstance(bv.get("value"), str) or \
                bv.get("isEncodingProblem") or bv.get("isTruncated"):
            # RFC 8621 §4.6: isEncodingProblem and isTruncated must be false (or absent) on create.
            raise ComposeError([f"bodyValues/{pid}"], "a body value is {value} with no encoding problem "
                               "and not truncated")
        body_values[pid] = bv["value"]

    if "bodyStructure" in create:
        if any(k in create for k in ("textBody", "htmlBody", "attachments")):
            raise ComposeError(["bodyStructure"], "bodyStructure excludes textBody, htmlBody and attachments")
        structure = create["bodyStructure"]
    else:
        structure = _structure_from_lists(create)
    missing: list[str] = []
    root = _build_part("bodyStructure", structure, body_values, fetch_blob, missing)
    if missing:
        raise MissingBlobs(missing)

    top = EmailMessage(policy=_COMPOSE_POLICY)
    seen: set[str] = set()

    def add(prop: str, name: str, value: Any, raw: bool = False) -> None:
        key = name.lower()
        if key in seen:
            raise ComposeError([prop], f"the {name} header field is given twice")
        if key.startswith("content-"):
            raise ComposeError([prop], "Content-* header fields come from the body parts")
        seen.add(key)
        _set_header(top, name, value, raw)

    for prop, name in _ADDRESS_PROPS.items():
        if create.get(prop) is not None:
            add(prop, name, tuple(_check_addresses(prop, create[prop])))
    for prop, name in _MSGID_PROPS.items():
        if create.get(prop) is not None:
            ids = _check_ids(prop, create[prop])
            if prop == "messageId" and len(ids) != 1:
                raise ComposeError([prop], "messageId must hold exactly one id")
            add(prop, name, " ".join(f"<{i}>" for i in ids))
    if create.get("subject") is not None:
        if not isinstance(create["subject"], str):
            raise ComposeError(["subject"], "subject must be a string")
        add("subject", "Subject", create["subject"])
    if create.get("sentAt") is not None:
        dt = parse_date(create["sentAt"], utc=False)
        if dt is None:
            raise ComposeError(["sentAt"], "sentAt must be an RFC 3339 date-time with an offset")
        add("sentAt", "Date", format_datetime(dt))
    raw_headers = create.get("headers")
    if raw_headers is not None:
        if not isinstance(raw_headers, list) or not all(
                isinstance(h, dict) and isinstance(h.get("name"), str) and isinstance(h.get("value"), str)
                for h in raw_headers):
            raise ComposeError(["headers"], "headers must be a list of {name, value} objects")
        for h in raw_headers:
            add("headers", h["name"], h["value"], True)
    for prop, value in create.items():
        if prop.startswith("header:"):
            try:
                hp = parse_header_property(prop)
            except ValueError as exc:
                raise ComposeError([prop], str(exc)) from None
            assert hp is not None
            instances = _header_from_form(prop, hp, value)
            for i, (name, v, raw) in enumerate(instances):
                if i:
                    seen.discard(name.lower())  # :all gives several instances of one field on purpose
                add(prop, name, v, raw)
    if "date" not in seen:
        top["Date"] = format_datetime(now)
    if "message-id" not in seen:
        top["Message-ID"] = f"<{uuid.uuid4().hex}@{id_domain}>"
    top["MIME-Version"] = "1.0"
    for name, value in root.raw_items():
        top.set_raw(name, value)
    top.set_payload(root.get_payload())
    try:
        return top.as_bytes(policy=_COMPOSE_POLICY)
    except Exception as exc:  # e.g. a header value the generator cannot fold or encode
        raise ComposeError(["headers"], f"the message cannot be serialised: {exc}") from None
