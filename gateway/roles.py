"""How each role composes the ports (DESIGN.md §1): which request path answers, who says who a client is, who keeps
accounts and their sharing, and how account-list changes reach open sockets. Part of the composition root: the
rest of the code sees ports, never a role.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.auth import Authenticator, DirectoryCheck, JwtVerifier, SignedTickets
from gateway.bus.base import Bus
from gateway.config import Settings
from gateway.directory import Delegations, Directory, Principal
from gateway.errors import HTTPProblem
from gateway.sharing import GrantStore, Sharing
from gateway.transport.ws import WebSocketService
from gateway.upstream.base import RequestPath

if TYPE_CHECKING:
    from gateway.bus.eventsource import StreamSource  # (httpx is imported only when the mode is on)


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    request_path: RequestPath
    auth: Authenticator
    delegations: Delegations
    directory: Directory | None  # the embedded directory of users; None when the upstream has the accounts
    attach: Callable[[WebSocketService], None]  # connects account-list changes to the open sockets


def all_in_one(settings: Settings, bus: Bus, directory: Directory, request_path: RequestPath | None = None) -> Role:
    """The embedded backend answers (or `request_path`, e.g. CoreOnly) and publishes its changes on `bus`; users,
    passwords and delegations are the directory's, the delegations kept in the backend's database."""
    store: GrantStore | None = None
    if request_path is None:
        from gateway.backend.service import EmbeddedBackend  # the mail store is loaded only in this role

        request_path = store = EmbeddedBackend(settings, directory, bus.publish)
    check = DirectoryCheck(directory, JwtVerifier(settings))
    auth = Authenticator(check, SignedTickets(settings.ticket_secret, settings.ticket_ttl, directory.principal))

    def attach(sockets: WebSocketService) -> None:
        # A grant or revocation takes effect on the delegate's open sockets at once.
        directory.add_listener(lambda _owner, delegate, _granted: sockets.refresh_user(delegate, directory.principal))

    return Role("all-in-one", request_path, auth, Sharing(directory, store), directory, attach)


class UpstreamSharing:
    """Delegations in front mode: the upstream's business."""

    async def grant(self, owner: str, delegate: str) -> bool:
        raise HTTPProblem(409, "In front mode accounts and their sharing are the upstream server's.")

    async def revoke(self, owner: str, delegate: str) -> bool:
        return await self.grant(owner, delegate)

    def resolve(self, name: str) -> str | None:
        raise HTTPProblem(409, "In front mode accounts and their sharing are the upstream server's.")


def front(settings: Settings) -> Role:
    """The upstream JMAP server at GATEWAY_UPSTREAM_URL answers requests and validates credentials."""
    from gateway.upstream.api import ProxyRequestPath
    from gateway.upstream.auth import HeldTickets, Rechecker, UpstreamCheck
    from gateway.upstream.client import UpstreamClient

    client = UpstreamClient(settings)
    path = ProxyRequestPath(settings, client)
    auth = Authenticator(UpstreamCheck(client, JwtVerifier(settings)), HeldTickets(settings.ticket_ttl))

    def attach(sockets: WebSocketService) -> None:
        if settings.auth_recheck > 0:
            # Revoked credentials close their sockets; accounts granted or taken away upstream follow.
            rechecker = Rechecker(client, settings.auth_recheck, lambda: sockets.connections, sockets.refresh)
            path.add_background(rechecker.run)

    return Role("front", path, auth, UpstreamSharing(), None, attach)


def upstream_stream(principal: Principal, owner: str) -> StreamSource | None:
    """Front mode with GATEWAY_UPSTREAM_EVENTS=eventsource: how `principal` opens the event stream of `owner`'s
    account at the upstream (its session's eventSourceUrl, its credentials, the account's id in its session); None
    when it cannot (a locally verified JWT without an upstream session, no eventSourceUrl, no such account)."""
    from gateway.bus.eventsource import StreamSource
    from gateway.upstream.session import FrontPrincipal

    if not isinstance(principal, FrontPrincipal) or principal.credentials is None or principal.upstream is None:
        return None
    url = principal.upstream.raw.get("eventSourceUrl")
    account = next((a.id for a in principal.accounts if a.owner == owner), None)
    if not isinstance(url, str) or account is None:
        return None
    return StreamSource(url, principal.credentials.header, account)
