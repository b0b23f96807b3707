"""Delegations of the all-in-one role (`/admin/delegations`): the directory's grants, kept in the embedded backend's
database so that they survive a restart, and announced to the other workers of a process group.

The database is the truth every worker shares; the directory is each process's copy of it, read at start (by the
embedded backend) and re-read for one grant whenever another worker says it changed. No I/O here besides the
ports it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.directory import Directory

log = logging.getLogger(__name__)

Announce = Callable[[str, str, bool], Awaitable[None]]


class GrantStore(Protocol):
    """Where grants are durable (the embedded backend's SQLite database, shared by the workers)."""

    async def set_grant(self, owner: str, delegate: str, granted: bool) -> bool:
        """Record or remove the grant once it is committed; True when that changed the database."""

    async def has_grant(self, owner: str, delegate: str) -> bool:
        """Whether the database holds the grant now."""


class Sharing:
    """The `Delegations` port of the all-in-one role. `store` None (a request path without a database, as in
    tests): the grants live in the directory only, as long as the process."""

    def __init__(self, directory: Directory, store: GrantStore | None) -> None:
        self._directory = directory
        self._store = store
        # Set in a worker of a process group (gateway.group): tells the other workers, returns once they know.
        self.announce: Announce | None = None

    def resolve(self, name: str) -> str | None:
        return self._directory.resolve(name)

    async def grant(self, owner: str, delegate: str) -> bool:
        return await self._change(owner, delegate, True)

    async def revoke(self, owner: str, delegate: str) -> bool:
        return await self._change(owner, delegate, False)

    async def _change(self, owner: str, delegate: str, granted: bool) -> bool:
        # The directory first: whatever it refuses is never stored; its listeners update this process's sockets.
        changed_here = self._apply(owner, delegate, granted)
        if self._store is None:
            changed = changed_here
        else:
            try:
                changed = await self._store.set_grant(owner, delegate, granted)
            except BaseException:
                if changed_here:  # not durable: this process must not act on it either
                    self._apply(owner, delegate, not granted)
                raise
        if self.announce is not None:
            # Announced even when nothing changed here: repeating a PUT or DELETE (idempotent) repairs a worker
            # that missed the first announcement (its announcer died between the commit and the announcement).
            try:
                await self.announce(owner, delegate, granted)
            except Exception as exc:
                # Committed: the other workers read it at their next start at the latest. The answer stands.
                log.warning("the other workers were not told of the delegation %s -> %s: %s", owner, delegate, exc)
        return changed

    async def changed_elsewhere(self, owner: str, delegate: str, granted: bool) -> None:
        """Another worker changed this grant to `granted`: take it as the database has it now (whatever order
        announcements of one grant arrive in, the last one read finds the final state)."""
        if self._store is not None:
            granted = await self._store.has_grant(owner, delegate)
        self._apply(owner, delegate, granted)

    def _apply(self, owner: str, delegate: str, granted: bool) -> bool:
        return self._directory.grant(owner, delegate) if granted else self._directory.revoke(owner, delegate)
