"""The JMAP methods of the embedded backend and the capability each needs in `using` (RFC 8620 §3.3).

`METHODS` maps a method name to (capability, handler); a handler takes the request context and the call's
arguments (result references already resolved) and returns the response arguments or raises MethodError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.backend.methods import email, identity, mailbox, thread, vacation
from gateway.backend.methods.common import Context
from gateway.jmap.types import CORE, MAIL, SUBMISSION, VACATION

Handler = Callable[[Context, dict[str, Any]], dict[str, Any]]


def _echo(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    # RFC 8620 §4.1: the arguments come back unchanged.
    return args


METHODS: dict[str, tuple[str, Handler]] = {
    "Core/echo": (CORE, _echo),
    "Mailbox/get": (MAIL, mailbox.get),
    "Mailbox/changes": (MAIL, mailbox.changes),
    "Mailbox/query": (MAIL, mailbox.query),
    "Mailbox/queryChanges": (MAIL, mailbox.query_changes),
    "Mailbox/set": (MAIL, mailbox.set_),
    "Thread/get": (MAIL, thread.get),
    "Thread/changes": (MAIL, thread.changes),
    "Email/get": (MAIL, email.get),
    "Email/changes": (MAIL, email.changes),
    "Email/query": (MAIL, email.query),
    "Email/queryChanges": (MAIL, email.query_changes),
    "Email/set": (MAIL, email.set_),
    # RFC 8621 §6: identities belong to the submission capability.
    "Identity/get": (SUBMISSION, identity.get),
    "Identity/changes": (SUBMISSION, identity.changes),
    "VacationResponse/get": (VACATION, vacation.get),
    "VacationResponse/set": (VACATION, vacation.set_),
}
