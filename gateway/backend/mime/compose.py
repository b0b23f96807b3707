"""RFC 8621 Email/set create objects -> RFC 5322 messages (RFC 8621 §4.6): 7-bit, CRLF, every header form.
Pure functions on plain data; callers pass `now` and a blob reader; no I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from email import policy
from email.headerregistry import Address, Group
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime
from typing import Any

from gateway.backend.mime.common import HeaderProperty, parse_bytes, parse_date, parse_header_property

# Composed messages are 7-bit clean (quoted-printable/base64 bodies, RFC 2047 headers) with CRLF line ends,
# so they can be relayed anywhere without 8BITMIME.
_COMPOSE_POLICY = policy.SMTP.clone(cte_type="7bit")


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

