"""Log hygiene (gateway.logs): redaction of credentials, rate-limited client mistakes, picows' reports."""

from __future__ import annotations

import base64
import logging

import pytest

from gateway.config import load
from gateway.logs import REDACTED, ClientMistakes, PicowsLog, RedactingFilter, settings_secrets

PASSWORD = "Sup3r-Secret-pw"
BASIC = base64.b64encode(f"bob@example.com:{PASSWORD}".encode()).decode()


def redact(text: str, *secrets: str) -> str:
    return RedactingFilter(secrets).redact(text)


@pytest.mark.parametrize("line", [
    # aiohttp's parser errors as they were logged (issue 16, 2): the header line, and its first 100 bytes.
    f"Invalid header value char:\n\n  b'Authorization: Basic {BASIC}\\x01'\n  ^",
    f"Got more than 8190 bytes when reading: b'Basic {BASIC[:20]}...'.",
    # a repr()'d head, as picows logs it at DEBUG
    f"New data: b'GET /jmap/ws HTTP/1.1\\r\\nauthorization: Basic {BASIC}\\r\\nHost: x\\r\\n\\r\\n'",
    f"GET /jmap/ws?ticket={BASIC}&x=1",
    "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJlc2lnbmF0dXJl",
    f"amqp://guest:{PASSWORD}@rabbit:5672/",
    f"Cookie: session={BASIC}; other=1",
])
def test_credentials_are_redacted_wherever_they_appear(line: str) -> None:
    out = redact(line)
    assert BASIC[:12] not in out and PASSWORD not in out and "eyJzdWIi" not in out
    assert REDACTED in out


def test_configured_secrets_are_redacted_anywhere() -> None:
    out = redact(f"weird place: {PASSWORD} and {BASIC}", PASSWORD, BASIC)
    assert PASSWORD not in out and BASIC not in out
    assert redact("bob@example.com logged in", "bob") == "bob@example.com logged in"  # too short to hunt for


def test_settings_secrets() -> None:
    s = load({"GATEWAY_USERS": f"bob@example.com:{PASSWORD}", "GATEWAY_ADMIN_TOKEN": "admin-token-1",
              "GATEWAY_AMQP_URL": "amqp://u:amqp-pass-1@h/"})
    found = settings_secrets(s)
    assert {PASSWORD, BASIC, "admin-token-1", "amqp-pass-1"} <= set(found)


def test_the_filter_redacts_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.logs.redaction")
    handler = logging.Handler()
    records: list[logging.LogRecord] = []
    handler.emit = records.append  # type: ignore[method-assign, assignment]
    handler.addFilter(RedactingFilter([PASSWORD]))
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"Authorization: Basic {BASIC}")
        except ValueError:
            logger.exception("failed for %s", PASSWORD)
    finally:
        logger.removeHandler(handler)
    (record,) = records
    text = logging.Formatter().format(record)
    assert PASSWORD not in text and BASIC not in text and "failed for [redacted]" in text
    assert "ValueError" in text  # the traceback is kept, redacted


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_client_mistakes_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    mistakes = ClientMistakes(logging.getLogger("test.clients"), interval=60, clock=clock)
    with caplog.at_level(logging.DEBUG, "test.clients"):
        for _ in range(5):
            mistakes.report("bad", "bad thing from %s", "1.2.3.4")
        mistakes.report("other", "other thing")
        clock.now = 61
        mistakes.report("bad", "bad thing from %s", "5.6.7.8")
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [lvl for lvl, _ in levels] == [logging.INFO] + [logging.DEBUG] * 4 + [logging.INFO, logging.INFO]
    assert "4 more like it" in levels[-1][1]
    assert all(r.exc_info is None for r in caplog.records)


def test_picows_peer_errors_become_client_mistakes(caplog: pytest.LogCaptureFixture) -> None:
    mistakes = ClientMistakes(logging.getLogger("test.gateway.clients"), clock=Clock())
    adapter = PicowsLog(logging.getLogger("test.picows"), mistakes)
    with caplog.at_level(logging.DEBUG):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            # picows' own calls (picows.pyx): a peer's protocol error at ERROR, our listener's fault with exception
            adapter.error("WS parser error: %s, initiate disconnect", (1002, "bad frame"))
            adapter.exception("Unhandled exception from user's WSListener.on_ws_frame")
        adapter.warning("Protocol writing pause requested, crossed writing buffer high-watermark")
    by_logger = [(r.name, r.levelno, bool(r.exc_info)) for r in caplog.records]
    assert by_logger == [("test.gateway.clients", logging.INFO, False), ("test.picows", logging.ERROR, True),
                         ("test.picows", logging.DEBUG, False)]
