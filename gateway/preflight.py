"""What an operator runs before starting: the list of settings (`jmap-gateway settings`, `--help`) and the checks
of `jmap-gateway check`.

Both read the same `SPECS` table that validates the environment at start. The checks look only at what can be
judged without starting: the settings, the JWT public key, the data directory, the native modules and whether the
listening ports are free. They bind nothing for longer than the check and never reach the network.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from gateway import native
from gateway.config import SPECS, ConfigError, Settings, load
from gateway.errors import ListenError

# Values never printed: secrets, and passwords inside URLs.
SECRET_SETTINGS = frozenset({"GATEWAY_USERS", "GATEWAY_JWT_SECRET", "GATEWAY_TICKET_SECRET", "GATEWAY_ADMIN_TOKEN"})
WIDTH = 100


def shown_value(name: str, value: str) -> str:
    """`value` as `settings` may print it: secrets masked, a URL's password replaced by ******."""
    if name in SECRET_SETTINGS:
        return "******"
    if "://" in value:
        parts = urlsplit(value)
        if parts.password:
            netloc = f"{parts.username}:******@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    return value


def settings_text(env: Mapping[str, str] | None = None, indent: str = "") -> str:
    """Every setting, its default and its meaning; with `env`, also the value set there (masked if secret)."""
    lines: list[str] = []
    for spec in SPECS:
        head = f"default: {spec.default}" if spec.default else "default: unset"
        if env is not None and spec.name in env:
            head += f"; set: {shown_value(spec.name, env[spec.name])}"
        lines.append(f"{indent}{spec.name} ({head})")
        lines.extend(textwrap.wrap(spec.help, WIDTH, initial_indent=indent + "    ",
                                   subsequent_indent=indent + "    ", break_on_hyphens=False))
    return "\n".join(lines)


# --- jmap-gateway check ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Result:
    ok: bool
    what: str
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what}: {self.detail}"


def run_checks(env: Mapping[str, str], refusal: Callable[[Settings], str | None]) -> list[Result]:
    """Every check, in order; later checks run only when the settings themselves are valid."""
    try:
        settings = load(env)
    except ConfigError as exc:
        return [Result(False, "settings", str(exc))]
    results = [Result(True, "settings", f"{len(SPECS)} settings valid "
                      f"({sum(1 for spec in SPECS if spec.name in env)} set in the environment)")]
    problem = refusal(settings)
    if problem is not None:
        results.append(Result(False, "workers", problem))
    results.extend(_jwt_key(settings))
    results.extend(_data_dir(settings))
    results.append(_native(settings))
    results.extend(_ports(settings))
    return results


def _jwt_key(settings: Settings) -> Iterator[Result]:
    path = settings.jwt_public_key
    if path is None:
        return
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as fh:
            key = load_pem_public_key(fh.read())
    except OSError as exc:
        yield Result(False, "GATEWAY_JWT_PUBLIC_KEY", f"{path} cannot be read: {exc.strerror or exc}")
        return
    except ValueError:
        yield Result(False, "GATEWAY_JWT_PUBLIC_KEY", f"{path} is not a PEM public key")
        return
    if isinstance(key, rsa.RSAPublicKey):
        yield Result(True, "GATEWAY_JWT_PUBLIC_KEY", f"{path}: RSA {key.key_size}-bit key (RS256)")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        yield Result(True, "GATEWAY_JWT_PUBLIC_KEY", f"{path}: EC {key.curve.name} key (ES256)")
    else:
        yield Result(False, "GATEWAY_JWT_PUBLIC_KEY", f"{path}: neither an RSA nor an EC key (RS256/ES256)")


def _writable(directory: str) -> str | None:
    """None when a file can be created in `directory` (a real attempt: permissions, read-only mounts)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".jmap-gateway-check-"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _data_dir(settings: Settings) -> Iterator[Result]:
    if settings.upstream_url:
        return  # front mode keeps no data
    path = settings.db_path
    if path == ":memory:" or path.startswith("file:"):
        yield Result(True, "database", f"{path} (nothing on disk to check)")
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        error = _writable(directory)
        if error is not None:
            yield Result(False, "data directory", f"{directory} is not writable: {error}")
        elif os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            yield Result(False, "database", f"{path} exists but cannot be read and written")
        else:
            yield Result(True, "data directory", f"{directory} is writable (database {path})")
        return
    # The backend creates the directory at start: its nearest existing ancestor must be writable.
    parent = directory
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            yield Result(False, "data directory", f"{parent} is in the way of {directory}: not a directory")
            return
        parent = os.path.dirname(parent)
    error = _writable(parent)
    if error is not None:
        yield Result(False, "data directory", f"{directory} does not exist and {parent} is not writable: {error}")
    else:
        yield Result(True, "data directory", f"{directory} will be created (in {parent}, writable)")


def _native(settings: Settings) -> Result:
    status = native.status()
    missing = [f"gateway.{name}" for name, ok in status.items() if not ok]
    if not missing:
        return Result(True, "native modules", "compiled: " + ", ".join(f"gateway.{name}" for name in status))
    if settings.require_native:
        return Result(False, "native modules", "GATEWAY_REQUIRE_NATIVE is set but " + ", ".join(missing)
                      + " cannot be imported (build them with `make native`)")
    return Result(True, "native modules", "Python twins run for " + ", ".join(missing)
                  + " (GATEWAY_REQUIRE_NATIVE is off; `make native` builds them)")


def _ports(settings: Settings) -> Iterator[Result]:
    listeners = [("HTTP/WebSocket", settings.host, settings.port, "GATEWAY_HOST", "GATEWAY_PORT", "0 = any free port")]
    if not settings.upstream_url and settings.smtp_port:
        listeners.append(("SMTP", settings.smtp_host, settings.smtp_port, "GATEWAY_SMTP_HOST", "GATEWAY_SMTP_PORT",
                          "0 = off"))
    for what, host, port, host_setting, port_setting, hint in listeners:
        if port == 0:
            yield Result(True, f"{what} port", "0: any free port at start")
            continue
        try:
            _try_bind(host, port)
        except OSError as exc:
            yield Result(False, f"{what} port", str(ListenError(what, host, port, host_setting, port_setting, hint,
                                                                exc)))
        else:
            yield Result(True, f"{what} port", f"{host}:{port} is free")


def _try_bind(host: str, port: int) -> None:
    """Bind (host, port) as the listener would, and release it at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As asyncio's create_server does, so that a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
