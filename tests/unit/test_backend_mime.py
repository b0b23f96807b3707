"""MIME parsing and composing of the embedded backend (gateway.backend.mime): RFC 8621 §4.1 properties."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.backend import mime
from tests.unit.test_backend_support import MULTIPART, PDF_BYTES

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def parts_by_id(structure: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any]) -> None:
        if node["partId"]:
            out[node["partId"]] = node
        for sub in node.get("subParts", ()):
            walk(sub)

    walk(structure)
    return out


def test_multipart_alternative_with_attachment() -> None:
    parsed = mime.parse_message(MULTIPART)
    p = parsed.properties
    parts = parts_by_id(p["bodyStructure"])
    # RFC 8621 §4.1.4: the text part is the text body, the HTML part the HTML body, the PDF an attachment.
    assert [parts[i]["type"] for i in p["textBody"]] == ["text/plain"]
    assert [parts[i]["type"] for i in p["htmlBody"]] == ["text/html"]
    assert [parts[i]["type"] for i in p["attachments"]] == ["application/pdf"]
    pdf = parts[p["attachments"][0]]
    assert pdf["name"] == "report.pdf" and pdf["disposition"] == "attachment"
    assert pdf["size"] == len(PDF_BYTES) and pdf["charset"] is None
    assert pdf["blobId"] == f"{parsed.blob_id}_{pdf['partId']}"
    assert mime.leaf_content(MULTIPART, pdf["partId"]) == PDF_BYTES
    assert p["hasAttachment"] is True
    assert p["subject"] == "Quarterly réport"
    assert p["preview"] == "The réport is attached."
    assert p["messageId"] == ["report-1@example.com"]
    assert p["sentAt"] == "2024-01-02T10:00:00+01:00"
    assert p["from"] == [{"name": "Alice", "email": "alice@example.com"}]
    assert p["to"] == [{"name": "Bob", "email": "bob@example.com"}, {"name": None, "email": "carol@example.com"}]
    assert p["bodyStructure"]["type"] == "multipart/mixed"
    assert [s["type"] for s in p["bodyStructure"]["subParts"]] == ["multipart/alternative", "application/pdf"]
    assert parsed.size == len(MULTIPART)
    assert parsed.body_text == "The réport is attached."


def test_body_values_decode_and_truncate_on_character_boundaries() -> None:
    values = mime.body_values(MULTIPART, ["1", "2"], 0)
    assert values["1"] == {"value": "The réport is attached.", "isEncodingProblem": False, "isTruncated": False}
    assert values["2"]["value"].startswith("<html>")
    # "The r" is 5 bytes and "é" two more: 6 bytes must not split the character.
    short = mime.body_values(MULTIPART, ["1"], 6)["1"]
    assert short == {"value": "The r", "isEncodingProblem": False, "isTruncated": True}


def test_html_only_message_shows_its_html_as_text_body_too() -> None:
    raw = (b"From: a@example.com\r\nSubject: html\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<p>Hello <i>world</i></p><script>evil()</script>\r\n")
    p = mime.parse_message(raw).properties
    assert p["textBody"] == p["htmlBody"] == ["1"]
    assert p["preview"] == "Hello world"
    assert p["hasAttachment"] is False


def test_related_inline_image_is_listed_but_not_an_attachment_flag() -> None:
    raw = (b"From: a@example.com\r\nContent-Type: multipart/related; boundary=r\r\n\r\n"
           b"--r\r\nContent-Type: text/html\r\n\r\n<img src=\"cid:logo\">\r\n"
           b"--r\r\nContent-Type: image/png\r\nContent-ID: <logo>\r\nContent-Disposition: inline\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--r--\r\n")
    p = mime.parse_message(raw).properties
    parts = parts_by_id(p["bodyStructure"])
    assert [parts[i]["type"] for i in p["attachments"]] == ["image/png"]
    assert parts[p["attachments"][0]]["cid"] == "logo"
    assert p["hasAttachment"] is False  # only inline parts


def test_unknown_charset_is_an_encoding_problem_and_latin1_is_decoded() -> None:
    raw = b"Content-Type: text/plain; charset=x-unknown\r\n\r\nabc\xff\r\n"
    assert mime.body_values(raw, ["1"], 0)["1"]["isEncodingProblem"] is True
    latin = b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n"
    assert mime.body_values(latin, ["1"], 0)["1"] == {"value": "café\r\n", "isEncodingProblem": False,
                                                      "isTruncated": False}


def test_header_forms() -> None:
    headers = mime.split_header_section(MULTIPART)
    assert headers[0] == {"name": "From", "value": " Alice <alice@example.com>"}

    def get(prop: str) -> Any:
        hp = mime.parse_header_property(prop)
        assert hp is not None
        return mime.header_value(headers, hp)

    assert get("header:Subject") == " =?utf-8?q?Quarterly_r=C3=A9port?="
    assert get("header:subject:asText") == "Quarterly réport"
    assert get("header:List-Unsubscribe:asURLs") == ["mailto:leave@example.com", "https://example.com/leave"]
    assert get("header:To:asGroupedAddresses") == [
        {"name": None, "addresses": [{"name": "Bob", "email": "bob@example.com"}]},
        {"name": "team", "addresses": [{"name": None, "email": "carol@example.com"}]},
    ]
    assert get("header:Date:asDate") == "2024-01-02T10:00:00+01:00"
    assert get("header:X-Missing") is None
    assert get("header:X-Missing:all") == []
    assert get("header:Message-ID:asMessageIds:all") == [["report-1@example.com"]]


@pytest.mark.parametrize("prop", ["header:From:asDate", "header:Subject:asAddresses", "header:X:asNothing",
                                  "header:X:all:asText", "header:"])
def test_forbidden_or_malformed_header_properties(prop: str) -> None:
    with pytest.raises(ValueError):
        mime.parse_header_property(prop)


def test_last_instance_wins_and_folds_are_kept_in_raw() -> None:
    raw = b"X-A: one\r\nX-A: two\r\n  folded\r\n\r\nbody"
    headers = mime.split_header_section(raw)
    hp = mime.parse_header_property("header:x-a")
    assert hp is not None
    assert mime.header_value(headers, hp) == " two\r\n  folded"
    text = mime.parse_header_property("header:X-A:asText:all")
    assert text is not None
    assert mime.header_value(headers, text) == ["one", "two  folded"]


def test_compose_then_parse_round_trip() -> None:
    raw = mime.compose_message({
        "from": [{"name": "Bób", "email": "bob@example.com"}],
        "to": [{"name": None, "email": "alice@example.com"}],
        "subject": "Lunch? ü",
        "inReplyTo": ["x1@example.com"],
        "references": ["x0@example.com", "x1@example.com"],
        "sentAt": "2024-05-01T09:30:00+02:00",
        "textBody": [{"partId": "t", "type": "text/plain"}],
        "htmlBody": [{"partId": "h", "type": "text/html"}],
        "bodyValues": {"t": {"value": "At noon? ü"}, "h": {"value": "<p>At noon?</p>"}},
        "attachments": [{"blobId": "B1", "type": "application/pdf", "name": "menu.pdf"}],
        "header:X-Custom:asText": "kept",
    }, fetch_blob=lambda b: PDF_BYTES if b == "B1" else None, id_domain="example.com", now=NOW)
    assert all(byte < 128 for byte in raw), "composed messages are 7-bit"
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    parsed = mime.parse_message(raw)
    p = parsed.properties
    assert p["from"] == [{"name": "Bób", "email": "bob@example.com"}]
    assert p["subject"] == "Lunch? ü"
    assert p["inReplyTo"] == ["x1@example.com"] and p["references"] == ["x0@example.com", "x1@example.com"]
    assert p["sentAt"] == "2024-05-01T09:30:00+02:00"
    assert p["messageId"][0].endswith("@example.com")
    assert mime.body_values(raw, p["textBody"], 0)[p["textBody"][0]]["value"].rstrip() == "At noon? ü"
    pdf = parts_by_id(p["bodyStructure"])[p["attachments"][0]]
    assert pdf["name"] == "menu.pdf" and mime.leaf_content(raw, pdf["partId"]) == PDF_BYTES
    assert parsed.message_ids[1:] == ["x1@example.com", "x0@example.com"]
    x_custom = mime.parse_header_property("header:X-Custom:asText")
    assert x_custom is not None and mime.header_value(p["headers"], x_custom) == "kept"


def test_compose_body_structure_and_default_empty_body() -> None:
    raw = mime.compose_message({"bodyStructure": {"type": "multipart/mixed", "subParts": [
        {"partId": "a", "type": "text/plain"}, {"partId": "b", "type": "text/csv", "name": "x.csv"}]},
        "bodyValues": {"a": {"value": "see csv"}, "b": {"value": "1,2\n"}}},
        fetch_blob=lambda b: None, id_domain="example.com", now=NOW)
    p = mime.parse_message(raw).properties
    assert len(p["textBody"]) == 1 and len(p["attachments"]) == 1
    empty = mime.compose_message({}, fetch_blob=lambda b: None, id_domain="d", now=NOW)
    assert mime.parse_message(empty).properties["bodyStructure"]["type"] == "text/plain"


@pytest.mark.parametrize(("create", "prop"), [
    ({"from": [{"email": "not an address"}]}, "from"),
    ({"from": "bob@example.com"}, "from"),
    ({"subject": 5}, "subject"),
    ({"sentAt": "yesterday"}, "sentAt"),
    ({"messageId": ["a@b", "c@d"]}, "messageId"),
    ({"textBody": [{"partId": "t"}], "bodyStructure": {"partId": "t"}, "bodyValues": {"t": {"value": "x"}}},
     "bodyStructure"),
    ({"textBody": [{"partId": "missing"}]}, "bodyStructure"),
    ({"textBody": [{"partId": "t"}], "bodyValues": {"t": {"value": "x", "isTruncated": True}}}, "bodyValues/t"),
    ({"subject": "a", "header:Subject:asText": "b"}, "header:Subject:asText"),
    ({"header:Content-Type": " text/html"}, "header:Content-Type"),
])
def test_compose_rejects_invalid_properties(create: dict[str, Any], prop: str) -> None:
    with pytest.raises(mime.ComposeError) as info:
        mime.compose_message(create, fetch_blob=lambda b: None, id_domain="d", now=NOW)
    assert info.value.properties == [prop]
    assert info.value.description


def test_compose_reports_missing_blobs() -> None:
    with pytest.raises(mime.MissingBlobs) as info:
        mime.compose_message({"attachments": [{"blobId": "nope"}, {"blobId": "nada"}]},
                             fetch_blob=lambda b: None, id_domain="d", now=NOW)
    assert info.value.blob_ids == ["nope", "nada"]


def test_garbage_never_raises() -> None:
    for raw in (b"", b"\x00\xff\xfe", b"Content-Type: multipart/mixed\r\n\r\nno boundary",
                b"From: <<<@@@>>>\r\nDate: not a date\r\nMessage-ID: junk\r\n\r\n"):
        p = mime.parse_message(raw).properties
        assert isinstance(p["textBody"], list)
        assert p["sentAt"] is None
