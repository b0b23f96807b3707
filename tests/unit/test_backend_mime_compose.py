"""Composing of the embedded backend's messages (gateway.backend.mime.compose): RFC 8621 §4.6 Email/set create,
checked by parsing what was composed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.backend.mime import common, compose, parse
from tests.unit.test_backend_support import PDF_BYTES, parts_by_id

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_compose_then_parse_round_trip() -> None:
    raw = compose.compose_message({
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
    parsed = parse.parse_message(raw)
    p = parsed.properties
    assert p["from"] == [{"name": "Bób", "email": "bob@example.com"}]
    assert p["subject"] == "Lunch? ü"
    assert p["inReplyTo"] == ["x1@example.com"] and p["references"] == ["x0@example.com", "x1@example.com"]
    assert p["sentAt"] == "2024-05-01T09:30:00+02:00"
    assert p["messageId"][0].endswith("@example.com")
    assert parse.body_values(raw, p["textBody"], 0)[p["textBody"][0]]["value"].rstrip() == "At noon? ü"
    pdf = parts_by_id(p["bodyStructure"])[p["attachments"][0]]
    assert pdf["name"] == "menu.pdf" and parse.leaf_content(raw, pdf["partId"]) == PDF_BYTES
    assert parsed.message_ids[1:] == ["x1@example.com", "x0@example.com"]
    x_custom = common.parse_header_property("header:X-Custom:asText")
    assert x_custom is not None and parse.header_value(p["headers"], x_custom) == "kept"


def test_compose_body_structure_and_default_empty_body() -> None:
    raw = compose.compose_message({"bodyStructure": {"type": "multipart/mixed", "subParts": [
        {"partId": "a", "type": "text/plain"}, {"partId": "b", "type": "text/csv", "name": "x.csv"}]},
        "bodyValues": {"a": {"value": "see csv"}, "b": {"value": "1,2\n"}}},
        fetch_blob=lambda b: None, id_domain="example.com", now=NOW)
    p = parse.parse_message(raw).properties
    assert len(p["textBody"]) == 1 and len(p["attachments"]) == 1
    empty = compose.compose_message({}, fetch_blob=lambda b: None, id_domain="d", now=NOW)
    assert parse.parse_message(empty).properties["bodyStructure"]["type"] == "text/plain"


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
    with pytest.raises(compose.ComposeError) as info:
        compose.compose_message(create, fetch_blob=lambda b: None, id_domain="d", now=NOW)
    assert info.value.properties == [prop]
    assert info.value.description


def test_compose_reports_missing_blobs() -> None:
    with pytest.raises(compose.MissingBlobs) as info:
        compose.compose_message({"attachments": [{"blobId": "nope"}, {"blobId": "nada"}]},
                             fetch_blob=lambda b: None, id_domain="d", now=NOW)
    assert info.value.blob_ids == ["nope", "nada"]

