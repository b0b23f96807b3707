"""RFC 5322/MIME messages -> RFC 8621 Email properties: header forms, body structure and flattening, body
values, search text (RFC 8621 §4.1). Pure functions on bytes; no database, no clock, no I/O.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address, Group
from email.message import Message
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any, cast

from gateway.backend.mime.common import HeaderProperty, format_date, parse_bytes, parse_date

PREVIEW_LENGTH = 256  # RFC 8621 §4.1.4: preview is at most 256 characters
SEARCH_TEXT_LIMIT = 256 * 1024  # characters of body text kept for the `text`/`body` filters

# --- header fields in their parsed forms (RFC 8621 §4.1.2) --------------------------------------------------

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
