"""Parsing of the embedded backend's messages (gateway.backend.mime.parse): RFC 8621 §4.1 Email properties."""

from __future__ import annotations

from typing import Any

from gateway.backend.mime import common, parse
from tests.unit.test_backend_support import MULTIPART, PDF_BYTES, parts_by_id


def test_multipart_alternative_with_attachment() -> None:
    parsed = parse.parse_message(MULTIPART)
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
    assert parse.leaf_content(MULTIPART, pdf["partId"]) == PDF_BYTES
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
    values = parse.body_values(MULTIPART, ["1", "2"], 0)
    assert values["1"] == {"value": "The réport is attached.", "isEncodingProblem": False, "isTruncated": False}
    assert values["2"]["value"].startswith("<html>")
    # "The r" is 5 bytes and "é" two more: 6 bytes must not split the character.
    short = parse.body_values(MULTIPART, ["1"], 6)["1"]
    assert short == {"value": "The r", "isEncodingProblem": False, "isTruncated": True}


def test_html_only_message_shows_its_html_as_text_body_too() -> None:
    raw = (b"From: a@example.com\r\nSubject: html\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<p>Hello <i>world</i></p><script>evil()</script>\r\n")
    p = parse.parse_message(raw).properties
    assert p["textBody"] == p["htmlBody"] == ["1"]
    assert p["preview"] == "Hello world"
    assert p["hasAttachment"] is False


def test_related_inline_image_is_listed_but_not_an_attachment_flag() -> None:
    raw = (b"From: a@example.com\r\nContent-Type: multipart/related; boundary=r\r\n\r\n"
           b"--r\r\nContent-Type: text/html\r\n\r\n<img src=\"cid:logo\">\r\n"
           b"--r\r\nContent-Type: image/png\r\nContent-ID: <logo>\r\nContent-Disposition: inline\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--r--\r\n")
    p = parse.parse_message(raw).properties
    parts = parts_by_id(p["bodyStructure"])
    assert [parts[i]["type"] for i in p["attachments"]] == ["image/png"]
    assert parts[p["attachments"][0]]["cid"] == "logo"
    assert p["hasAttachment"] is False  # only inline parts


def test_unknown_charset_is_an_encoding_problem_and_latin1_is_decoded() -> None:
    raw = b"Content-Type: text/plain; charset=x-unknown\r\n\r\nabc\xff\r\n"
    assert parse.body_values(raw, ["1"], 0)["1"]["isEncodingProblem"] is True
    latin = b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n"
    assert parse.body_values(latin, ["1"], 0)["1"] == {"value": "café\r\n", "isEncodingProblem": False,
                                                      "isTruncated": False}


def test_header_forms() -> None:
    headers = parse.split_header_section(MULTIPART)
    assert headers[0] == {"name": "From", "value": " Alice <alice@example.com>"}

    def get(prop: str) -> Any:
        hp = common.parse_header_property(prop)
        assert hp is not None
        return parse.header_value(headers, hp)

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



def test_last_instance_wins_and_folds_are_kept_in_raw() -> None:
    raw = b"X-A: one\r\nX-A: two\r\n  folded\r\n\r\nbody"
    headers = parse.split_header_section(raw)
    hp = common.parse_header_property("header:x-a")
    assert hp is not None
    assert parse.header_value(headers, hp) == " two\r\n  folded"
    text = common.parse_header_property("header:X-A:asText:all")
    assert text is not None
    assert parse.header_value(headers, text) == ["one", "two  folded"]



def test_garbage_never_raises() -> None:
    for raw in (b"", b"\x00\xff\xfe", b"Content-Type: multipart/mixed\r\n\r\nno boundary",
                b"From: <<<@@@>>>\r\nDate: not a date\r\nMessage-ID: junk\r\n\r\n"):
        p = parse.parse_message(raw).properties
        assert isinstance(p["textBody"], list)
        assert p["sentAt"] is None
