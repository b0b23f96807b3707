"""Log lines: the JSON shape (fields, extras, exceptions) and the quieting of libraries' INFO lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.cli import THIRD_PARTY_LOGGERS, JsonLines, configure_logging


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines({"worker": 2}))
    logger = logging.getLogger("gateway.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_one_object_per_line_with_the_fixed_fields_first(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_log
    logger.info("request path failed for %s", "bob@example.com", extra={"username": "bob@example.com"})
    logger.warning("multi\nline")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert first["level"] == "INFO" and first["logger"] == "gateway.test_logs"
    assert first["message"] == "request path failed for bob@example.com"
    assert first["username"] == "bob@example.com" and first["worker"] == 2
    assert second["message"] == "multi\nline"  # newlines stay inside the one JSON line


def test_an_exception_is_one_field(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_log
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("delivery failed")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "ValueError: boom" in record["exc_info"]


@pytest.mark.parametrize(("level", "expected"), [("INFO", logging.WARNING), ("ERROR", logging.ERROR),
                                                 ("DEBUG", logging.DEBUG)])
def test_libraries_info_lines_are_quiet_unless_debug(level: str, expected: int) -> None:
    saved = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    try:
        configure_logging(level)
        assert logging.getLogger("mail.log").getEffectiveLevel() == expected  # aiosmtpd
        assert logging.getLogger("picows.server").getEffectiveLevel() == expected
    finally:
        for name, value in saved.items():
            logging.getLogger(name).setLevel(value)
