"""The reporter's flow with a real JMAP client library, jmaplib (import name `jmap`), against a gateway process
(all-in-one role, SMTP): push over `WebSocketClient`, a mail, the socket closed, another mail, then a new
`WebSocketClient(client, push_state=...)` and `enable_push(..., resume=True)`: the missed change is pushed
(RFC 8887 §4.3.5), with the states the JMAP API reports.

jmaplib's `notifications()` blocks without a timeout, so each wait runs it on a worker thread with a deadline
(a daemon thread, so that a failure cannot hang the test run).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from jmap.auth import BasicAuth
from jmap.client import JMAPClient
from jmap.core.ids import Id
from jmap.models.push import StateChange
from jmap.push import WebSocketClient

from gateway.directory import account_id_for
from tests.conftest import BOB
from tests.model.harness import WAIT, GatewayProcess, send_mail, server_states

BOB_ACC = account_id_for(BOB[0])
TYPES = ["Email", "Mailbox"]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path, "gateway")
    gw.start()
    yield gw
    gw.stop()


def next_change(ws: WebSocketClient) -> StateChange:
    """The next StateChange on `ws`, or a failure after WAIT seconds."""
    box: queue.Queue[StateChange | BaseException] = queue.Queue()
    changes = ws.notifications()

    def read() -> None:
        try:
            box.put(next(changes))
        except BaseException as exc:
            box.put(exc)

    # A daemon thread: after a failure it may stay blocked in jmaplib's read until the process exits.
    threading.Thread(target=read, daemon=True).start()
    try:
        item = box.get(timeout=WAIT)
    except queue.Empty:
        raise AssertionError(f"no StateChange within {WAIT}s") from None
    if isinstance(item, BaseException):
        raise item
    return item


def test_jmaplib_resume_gets_the_missed_change(gateway: GatewayProcess) -> None:
    # jmaplib takes its default account from primaryAccounts["urn:ietf:params:jmap:core"]; the gateway names
    # primary accounts per account capability (RFC 8620 §2), and core is none: name the account.
    with JMAPClient.connect(gateway.base + "/.well-known/jmap", auth=BasicAuth(*BOB), account_id=Id(BOB_ACC)) as client:
        with WebSocketClient(client) as ws:
            ws.enable_push(TYPES)
            # A request over the same socket: its answer comes after the enable was read.
            with ws.batch() as batch:
                emails = batch.mail.email.get(ids=[])
            assert emails.result.state is not None
            send_mail(gateway.smtp_port, [BOB[0]], "the first mail")
            change = next_change(ws)
            assert set(change.states_for(BOB_ACC)) == set(TYPES)
            kept = ws.push_state
        assert kept is not None

        send_mail(gateway.smtp_port, [BOB[0]], "the mail sent while away")
        now = server_states(gateway.base, BOB, BOB_ACC)
        assert now["Email"] != change.states_for(BOB_ACC)["Email"]

        with WebSocketClient(client, push_state=kept) as ws:
            ws.enable_push(TYPES, resume=True)
            missed = next_change(ws)
            assert missed.states_for(BOB_ACC) == {t: now[t] for t in TYPES}
            assert ws.push_state not in (None, kept)
            with ws.batch() as batch:
                emails = batch.mail.email.get(ids=[])
            assert emails.result.state == now["Email"]
