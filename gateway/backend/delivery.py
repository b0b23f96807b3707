"""What a mail delivery to the embedded backend is, for the doors that take mail in (the SMTP listener): the
recipients resolved against the directory, the size limit, and the `Deliver` port they call. No I/O here.
"""

from __future__ import annotations

from typing import Protocol

from gateway.directory import Directory
from gateway.errors import GatewayError

MAX_SIZE_ATTACHMENTS = 32 * 1024 * 1024  # RFC 8621 §1.3.1 maxSizeAttachmentsPerEmail (aiosmtpd's size limit)


class UnknownRecipient(GatewayError):
    """A delivery names an address that is no user of the directory."""


def resolve_recipient(directory: Directory, address: str) -> str | None:
    """The directory username an envelope address delivers to (exact, else case-insensitively), or None."""
    return directory.resolve(address)


class Deliver(Protocol):
    async def deliver(self, recipients: list[str], raw: bytes) -> dict[str, str]:
        """Store `raw` in each recipient's Inbox durably; username -> new emailId. Raises UnknownRecipient before
        storing anything if a recipient is no user."""
