"""What parsing and composing share (gateway.backend.mime.common): RFC 3339 dates and the `header:` property
grammar of RFC 8621 §4.1.3."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.backend.mime import common


@pytest.mark.parametrize("prop", ["header:From:asDate", "header:Subject:asAddresses", "header:X:asNothing",
                                  "header:X:all:asText", "header:"])
def test_forbidden_or_malformed_header_properties(prop: str) -> None:
    with pytest.raises(ValueError):
        common.parse_header_property(prop)



def test_header_property_parts() -> None:
    assert common.parse_header_property("subject") is None  # not a header: property at all
    hp = common.parse_header_property("header:List-Post:asURLs:all")
    assert hp == common.HeaderProperty("List-Post", "URLs", True) and hp.key == "list-post"
    assert common.parse_header_property("header:X-Any:asDate") == common.HeaderProperty("X-Any", "Date", False)


# RFC 8620 §1.4: Date is an RFC 3339 date-time with an offset; UTCDate must use "Z".
@pytest.mark.parametrize(("value", "utc", "expected"), [
    ("2024-05-01T09:30:00Z", True, datetime(2024, 5, 1, 9, 30, tzinfo=UTC)),
    ("2024-05-01T09:30:00.250Z", True, datetime(2024, 5, 1, 9, 30, 0, 250000, tzinfo=UTC)),
    ("2024-05-01T09:30:00+02:00", False, datetime(2024, 5, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))),
    ("2024-05-01T09:30:00+02:00", True, None),
    ("2024-05-01 09:30:00Z", False, None),
    ("2024-05-01T09:30:00", False, None),
    ("2024-13-01T09:30:00Z", False, None),
    (20240501, False, None),
])
def test_parse_date(value: object, utc: bool, expected: datetime | None) -> None:
    assert common.parse_date(value, utc=utc) == expected


def test_format_dates() -> None:
    assert common.format_utc(1414678320) == "2014-10-30T14:12:00Z"
    assert common.format_date(datetime(2024, 1, 2, 10, 0, 5, 999, tzinfo=timezone(timedelta(hours=1)))) \
        == "2024-01-02T10:00:05+01:00"
    assert common.format_date(datetime(2024, 1, 2, 10, 0)) == "2024-01-02T10:00:00Z"  # no zone known: UTC
