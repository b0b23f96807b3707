"""The embedded account directory: users, their passwords, accountIds, and delegation between accounts.

The accountId of a username is the lowercase hex SHA-256 of it (Apache James's scheme, DESIGN.md §5), so accounts
look the same to clients whether the gateway fronts James or runs its embedded backend. No I/O here.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from typing import Protocol

import msgspec


def account_id_for(username: str) -> str:
    """James's accountId of `username`: lowercase hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(username.encode()).hexdigest()


class Account(msgspec.Struct, frozen=True, gc=False):
    """An account a user may use: their own (`is_personal`) or one delegated to them by `owner`."""

    id: str
    name: str
    owner: str
    is_personal: bool


class Principal(msgspec.Struct, gc=False):
    """An authenticated user, as established once at the upgrade or HTTP call.

    `expires_at` is a wall-clock UNIX time (a JWT's `exp`) after which the socket is closed with 1008.
    """

    username: str
    accounts: list[Account]
    expires_at: float | None = None

    @property
    def account_ids(self) -> list[str]:
        return [a.id for a in self.accounts]

    def may_use(self, account_id: str) -> bool:
        return any(a.id == account_id for a in self.accounts)


DelegationListener = Callable[[str, str, bool], None]
# RFC 5321 §4.5.3.1.3: a path (an address) is at most 256 octets; no username of ours is longer.
MAX_USERNAME = 256


class UnknownUser(KeyError):
    """A name that is no user of the directory."""


class Delegations(Protocol):
    """`/admin/delegations`: who may share whose account (RFC 9670). The embedded role keeps them in the Directory
    and its database (gateway.sharing); in front mode sharing is the upstream's and both calls refuse (409)."""

    async def grant(self, owner: str, delegate: str) -> bool:
        """Let `delegate` use `owner`'s account; False when it already could."""

    async def revoke(self, owner: str, delegate: str) -> bool:
        """Take it back; False when there was nothing to take back."""

    def resolve(self, name: str) -> str | None:
        """The username `name` stands for (Directory.resolve), None when it is no user."""


class Directory:
    """Users with passwords (GATEWAY_USERS) and owner -> delegate grants."""

    def __init__(self, users: Iterable[tuple[str, str]]) -> None:
        self._passwords: dict[str, bytes] = {u: p.encode() for u, p in users}
        self._delegates: dict[str, set[str]] = {}  # owner -> delegates
        self._listeners: list[DelegationListener] = []

    def usernames(self) -> list[str]:
        return list(self._passwords)

    def exists(self, username: str) -> bool:
        return username in self._passwords

    def resolve(self, name: str) -> str | None:
        """The username `name` stands for: itself, else the one user equal to it case-insensitively (as mail
        addresses are, in practice: RFC 5321 §2.4), else None. SMTP recipients and admin names go through here."""
        if name in self._passwords:
            return name
        if len(name) > MAX_USERNAME:
            return None
        folded = name.casefold()
        for username in self._passwords:
            if username.casefold() == folded:
                return username
        return None

    def check_password(self, username: str, password: str) -> bool:
        expected = self._passwords.get(username)
        # Compare even for unknown users so that timing does not reveal which usernames exist.
        ok = hmac.compare_digest(expected or b"\0" * 16, password.encode())
        return expected is not None and ok

    def accounts_for(self, username: str) -> list[Account]:
        """The user's own account first, then every account delegated to them (RFC 9670 sharing)."""
        accounts = [Account(account_id_for(username), username, username, True)]
        for owner, delegates in sorted(self._delegates.items()):
            if username in delegates and owner != username:
                accounts.append(Account(account_id_for(owner), owner, owner, False))
        return accounts

    def principal(self, username: str, expires_at: float | None = None) -> Principal:
        return Principal(username, self.accounts_for(username), expires_at)

    def add_listener(self, listener: DelegationListener) -> None:
        """`listener(owner, delegate, granted)` is called after every change of a grant."""
        self._listeners.append(listener)

    def grant(self, owner: str, delegate: str) -> bool:
        """Let `delegate` use `owner`'s account; False when it already could. Both must be users (UnknownUser):
        grants name accounts that exist, so they cannot pile up for names that do not."""
        for name in (owner, delegate):
            if name not in self._passwords:
                raise UnknownUser(name)
        current = self._delegates.setdefault(owner, set())
        if delegate in current:
            return False
        current.add(delegate)
        for listener in self._listeners:
            listener(owner, delegate, True)
        return True

    def revoke(self, owner: str, delegate: str) -> bool:
        current = self._delegates.get(owner)
        if not current or delegate not in current:
            return False
        current.discard(delegate)
        for listener in self._listeners:
            listener(owner, delegate, False)
        return True
