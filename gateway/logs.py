"""Log hygiene: no credential reaches a log line, and clients' mistakes do not flood the log.

- `RedactingFilter` goes on the root handlers (cli.configure_logging): every record, from any logger (ours,
  aiohttp's, picows', aio-pika's), is formatted and redacted before it is written: credentials after
  `Authorization:`-like header names, after `Basic`/`Bearer`, in `ticket=`-like parameters, JWTs, the password
  of URLs, and every secret of the settings (passwords, their Basic forms, tokens, keys) wherever they appear.
- `ClientMistakes` logs what a client did wrong (a malformed head, a WebSocket protocol violation) once per
  kind and interval at INFO, the rest at DEBUG, never with a traceback: ERROR is for the gateway's own faults.
- `PicowsLog` is the logger picows is given: it sends picows' reports of a peer's protocol errors (which picows
  logs at ERROR) to `ClientMistakes`, and everything else through unchanged.

No I/O here besides logging itself.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Settings

REDACTED = "[redacted]"
MIN_SECRET = 6  # shorter configured secrets are left to the patterns (they would mangle ordinary words)

# Header names whose value is a credential, then the value up to the end of its line: a real line end, the
# escaped one of a repr()'d head (\r, \n), or the quote that closes a repr()'d bytes object.
_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-api-key|x-auth-token)(\s*[:=]\s*)"
    r"(?:[^\r\n\\'\"]|\\(?![rn'\"]))*")
_SCHEME = re.compile(r"(?i)\b(basic|bearer|digest|negotiate)(\s+)[A-Za-z0-9._~+/=-]+")
_PARAM = re.compile(r"(?i)\b(ticket|access_token|token|password|passwd|secret|api_key)=[^&\s'\"\\]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^@\s/]+@")


def settings_secrets(settings: Settings) -> list[str]:
    """Every secret the settings hold, in the forms a request or a URL would carry them."""
    found: list[str] = []
    for user, password in settings.users:
        found.append(password)
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        # The Basic form without its padding too: a log that cuts a value keeps a prefix of it.
        found += [basic, basic.rstrip("=")]
    found += [s for s in (settings.admin_token, settings.jwt_secret, settings.ticket_secret) if s]
    if settings.amqp_url:
        amqp_password = _amqp_password(settings.amqp_url)
        if amqp_password:
            found.append(amqp_password)
    return found


def _amqp_password(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password
    except ValueError:
        return None


class RedactingFilter(logging.Filter):
    """Redacts credentials in every record it sees (message, arguments, traceback, stack); never drops one."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so that a secret containing another is replaced whole.
        unique = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)
        self._secrets = re.compile("|".join(re.escape(s) for s in unique)) if unique else None

    def redact(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
        text = _SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
        text = _PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
        text = _JWT.sub(REDACTED, text)
        return _USERINFO.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken record: logging reports it itself, without our help
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install_redaction(secrets: Iterable[str] = (), logger: logging.Logger | None = None) -> RedactingFilter:
    """Put one RedactingFilter on every handler of `logger` (default: the root logger)."""
    target = logger or logging.getLogger()
    redacting = RedactingFilter(secrets)
    for handler in target.handlers:
        handler.addFilter(redacting)
    return redacting


class ClientMistakes:
    """The log of clients' mistakes: per kind, the first in each `interval` at INFO (with the number of those
    logged at DEBUG since), the others at DEBUG. Kinds are a small fixed set chosen by the callers."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def report(self, kind: str, msg: str, *args: Any) -> None:
        now = self._clock()
        if now - self._last.get(kind, -math.inf) >= self._interval:
            quiet = self._quiet.pop(kind, 0)
            if quiet:
                msg += f" ({quiet} more like it since the last one logged at INFO, at DEBUG)"
            self._last[kind] = now
            self._logger.info(msg, *args)
        else:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            self._logger.debug(msg, *args)


# What picows logs about its peer: the start of its message -> our kind. Reports of our own faults (an
# exception from the listener, a parser failure that is no protocol error) are not here and stay ERROR.
_PICOWS_PEER = {
    "WS parser error": "websocket-protocol-error",
    "Disconnect because HTTP request violated": "websocket-head-too-large",
    "Handshake timeout": "websocket-handshake-timeout",
}
# Backpressure of one socket is the normal life of a slow client, not news for the operator.
_PICOWS_ROUTINE = ("Protocol writing pause requested", "Protocol writing resume requested")


class PicowsLog(logging.LoggerAdapter[logging.Logger]):
    """The logger-like object picows is given (also so that it makes no child Logger per connection)."""

    def __init__(self, logger: logging.Logger, mistakes: ClientMistakes | None = None) -> None:
        super().__init__(logger, {})
        self.mistakes = mistakes or ClientMistakes(logger)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str):
            for prefix, kind in _PICOWS_PEER.items():
                if msg.startswith(prefix):
                    self.mistakes.report(kind, "WebSocket peer: " + msg, *args)  # no traceback
                    return
            if msg.startswith(_PICOWS_ROUTINE):
                level = min(level, logging.DEBUG)
        super().log(level, msg, *args, **kwargs)
