"""A throwaway Cyrus IMAP (Debian's `cyrus-imapd` with its httpd JMAP module) for tests: a real upstream JMAP
server no one here wrote.

Everything lives under one temporary directory: configuration, mailbox partition, databases, the SASL password
file, the LMTP socket and the master's pid file; IMAP and HTTP listen on free loopback ports. Cyrus services
refuse to run as root, so when the tests run as root the directory belongs to the `cyrus` user the package
created and the services run as that user; otherwise as the current user (CYRUS_USER). Nothing outside the
directory is written, and Cyrus logs only to syslog (absent here): a failed start reports the master's own log.

A missing Cyrus skips the tests, except under CI=true: there it fails them (`.ci/run` installs the packages).
A Cyrus that is installed but does not start fails them everywhere.

Facts of Debian's 3.6.1 build worth knowing (cyr_buildinfo: "jmap": true, "wslay": false):
- the session resource is GET /jmap/ (/.well-known/jmap redirects to /jmap); its URLs are relative (apiUrl
  "/jmap/", eventSourceUrl "/jmap/eventsource/?types={types}&closeafter={closeafter}&ping={ping}"); accountIds
  are the usernames (not SHA-256); there is no urn:ietf:params:jmap:websocket capability;
- its EventSource answers 204 No Content to every request: http_jmap.c reads `jmap_pushpoll` only when WebSocket
  support (wslay) is compiled in, and the push poll interval stays 0 otherwise;
- every answer carries `Connection: Upgrade`, `Upgrade: h2c` (an offer of HTTP/2 over cleartext).
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CYRUS_BIN = Path(os.environ.get("CYRUS_BIN", "/usr/lib/cyrus/bin"))
SERVICES = ("master", "imapd", "httpd", "lmtpd", "ctl_cyrusdb")
SERVERNAME = "localhost"  # also the SASL realm of the users in the password file
START_TIMEOUT = 30.0


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the Cyrus tests must run)", pytrace=False)
    pytest.skip(reason)


def require_cyrus() -> None:
    """Skip (fail under CI) when Cyrus's binaries, saslpasswd2 or (as root) the `cyrus` user are missing."""
    missing = [name for name in SERVICES if not (CYRUS_BIN / name).is_file()]
    if _saslpasswd2() is None:
        missing.append("saslpasswd2")
    if missing:
        _unavailable(f"Cyrus IMAP is not installed ({', '.join(missing)} missing; "
                     "apt-get install cyrus-imapd cyrus-caldav sasl2-bin)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("cyrus")
        except KeyError:
            _unavailable("there is no `cyrus` user to run Cyrus's services as (the cyrus-common package adds it)")


def _saslpasswd2() -> str | None:
    # In /usr/sbin, which a non-root PATH may lack.
    found = shutil.which("saslpasswd2")
    if found is None and os.access("/usr/sbin/saslpasswd2", os.X_OK):
        found = "/usr/sbin/saslpasswd2"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cyrus:
    """A running Cyrus: where it listens and the one user it has (with an INBOX)."""

    root: Path
    http_port: int
    imap_port: int
    lmtp_socket: Path
    user: str
    password: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def session_url(self) -> str:
        return f"{self.base_url}/jmap/"

    @property
    def authorization(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def deliver(self, raw: bytes, sender: str = "carol@example.org") -> None:
        """One LMTP transaction to the user over Cyrus's UNIX socket; returns once Cyrus said 250 (the message
        is in the INBOX). Blocking: run it in a thread from a loop."""
        with smtplib.LMTP(str(self.lmtp_socket), timeout=30) as lmtp:
            refused = lmtp.sendmail(sender, [self.user], raw)
        assert refused == {}, refused


def _imapd_conf(root: Path) -> str:
    return f"""\
configdirectory: {root}/conf
defaultpartition: default
partition-default: {root}/spool
sievedir: {root}/sieve
temp_path: {root}/run
proc_path: {root}/run/proc
mboxname_lockpath: {root}/run/lock
lmtpsocket: {root}/run/socket/lmtp
idlesocket: {root}/run/socket/idle
notifysocket: {root}/run/socket/notify
servername: {SERVERNAME}
admins: admin
altnamespace: yes
unixhierarchysep: yes
lmtp_downcase_rcpt: yes
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {root}/conf/sasldb2
sasl_mech_list: PLAIN LOGIN
httpmodules: jmap
# JMAP needs the conversations database (http_jmap.c refuses to enable the module without it).
conversations: yes
# Honoured only by builds with WebSocket support (wslay); Debian's 3.6 has none, its EventSource stays off.
jmap_pushpoll: 1s
master_bind_errors_fatal: yes
syslog_prefix: cyrus-test
"""


def _cyrus_conf(root: Path, imap_port: int, http_port: int) -> str:
    conf = root / "imapd.conf"
    return f"""\
START {{
  recover cmd="ctl_cyrusdb -r -C {conf}"
}}
SERVICES {{
  imap cmd="imapd -C {conf}" listen="127.0.0.1:{imap_port}" prefork=0
  http cmd="httpd -C {conf}" listen="127.0.0.1:{http_port}" prefork=0
  lmtpunix cmd="lmtpd -C {conf}" listen="{root}/run/socket/lmtp" prefork=0
}}
EVENTS {{
}}
"""


def _add_sasl_user(root: Path, user: str, password: str) -> None:
    command = [_saslpasswd2() or "saslpasswd2", "-p", "-c", "-f", str(root / "conf" / "sasldb2"), "-u", SERVERNAME]
    subprocess.run([*command, user], input=password.encode(), check=True, capture_output=True, timeout=30)


def _wait(condition: Callable[[], bool], what: str, master: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if master.poll() is not None:
            pytest.fail(f"Cyrus's master exited with {master.returncode} while {what}; its log:\n"
                        f"{log.read_text(errors='replace') if log.exists() else '(none)'}")
        if condition():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"Cyrus did not get ready in {START_TIMEOUT:g}s ({what}); master log:\n"
                        f"{log.read_text(errors='replace') if log.exists() else '(none)'}")
        time.sleep(0.05)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _jmap_session_ok(cyrus: Cyrus) -> bool:
    request = urllib.request.Request(cyrus.session_url, headers={"Authorization": cyrus.authorization})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_cyrus(user: str = "bob", password: str = "bob-cyrus-pw") -> Iterator[Cyrus]:
    """Start a Cyrus with JMAP, give it `user` (password and INBOX), yield it, stop it and remove its files."""
    require_cyrus()
    root = Path(tempfile.mkdtemp(prefix="cyrus-"))
    master: subprocess.Popen[bytes] | None = None
    try:
        for sub in ("conf", "spool", "sieve", "run/socket", "run/lock", "run/proc"):
            (root / sub).mkdir(parents=True)
        imap_port, http_port = free_port(), free_port()
        (root / "imapd.conf").write_text(_imapd_conf(root))
        (root / "cyrus.conf").write_text(_cyrus_conf(root, imap_port, http_port))
        admin_password = base64.b32encode(os.urandom(10)).decode()
        _add_sasl_user(root, "admin", admin_password)
        _add_sasl_user(root, user, password)
        env = dict(os.environ)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("cyrus")
            for path in (root, *root.rglob("*")):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            env["CYRUS_USER"] = "cyrus"
        else:
            env["CYRUS_USER"] = pwd.getpwuid(os.geteuid()).pw_name
        log = root / "master.log"
        # -D: stay in the foreground (this process's child, stopped by pid); its own session, so that a master
        # that does not stop can be killed with its services, and nothing else.
        master = subprocess.Popen(
            [str(CYRUS_BIN / "master"), "-C", str(root / "imapd.conf"), "-M", str(root / "cyrus.conf"),
             "-p", str(root / "run" / "master.pid"), "-D", "-L", str(log)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        cyrus = Cyrus(root, http_port, imap_port, root / "run" / "socket" / "lmtp", user, password)
        _wait(lambda: _accepts(imap_port) and _accepts(http_port) and cyrus.lmtp_socket.exists(),
              "starting its services", master, log)
        # The user's INBOX, created by the admin over IMAP (what cyradm does).
        with imaplib.IMAP4("127.0.0.1", imap_port) as imap:
            imap.login("admin", admin_password)
            status, detail = imap.create(f"user/{user}")
            assert status == "OK", detail
        _wait(lambda: _jmap_session_ok(cyrus), "answering its JMAP session resource", master, log)
        yield cyrus
    finally:
        if master is not None:
            _stop(master)
        shutil.rmtree(root, ignore_errors=True)


def _stop(master: subprocess.Popen[bytes]) -> None:
    # SIGTERM: the master stops every service it started, then itself.
    with contextlib.suppress(ProcessLookupError):
        master.send_signal(signal.SIGTERM)
    try:
        master.wait(timeout=15)
    except subprocess.TimeoutExpired:
        master.kill()
        master.wait(timeout=15)
    # A service still alive after its master would keep the ports: end the master's session (its own group).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(master.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cyrus() -> Iterator[Cyrus]:
    """A throwaway Cyrus with JMAP for the module: its session URL, the user's credentials and LMTP delivery."""
    with running_cyrus() as server:
        yield server
