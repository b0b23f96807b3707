"""A process group's control channel (gateway.group) over real socket pairs, both ends in this process: requests
and replies, the end of a channel, the group's one /metrics page (fresh figures, late and dead workers), and the
relay of delegation changes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import group
from gateway.directory import Directory
from gateway.errors import Unavailable
from gateway.group import Channel, Collect, Done, Figures, GroupError, GroupHub, Page, Request, Scrape, WorkerLink
from gateway.metrics import Metrics, figures
from gateway.sharing import Sharing

BOB, ALICE = "bob@example.com", "alice@example.com"


def values(page: bytes) -> dict[str, float]:
    """Unlabelled samples, and labelled ones as name{k=v,...}."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(page.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def pair(handle_a: group.Handler, handle_b: group.Handler) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return await Channel.open(a, handle_a), await Channel.open(b, handle_b)


async def refuse(request: Request) -> group.Reply:
    raise GroupError(f"no {type(request).__name__} here")


async def test_a_request_is_answered_by_the_other_end() -> None:
    async def pages(request: Request) -> group.Reply:
        assert isinstance(request, Scrape)
        return Page(request.id, b"page %d" % request.id)

    asker, answerer = await pair(refuse, pages)
    got = await asyncio.gather(*(asker.ask(Scrape, Page, 5) for _ in range(3)))  # concurrent, matched by id
    assert sorted(p.body for p in got) == [b"page 1", b"page 2", b"page 3"]
    with pytest.raises(GroupError, match="no Collect here"):  # a failure there is an error here
        await answerer.ask(Collect, Figures, 5)
    with pytest.raises(GroupError, match="Page answered where Done was expected"):
        await asker.ask(Scrape, Done, 5)
    await asker.close()
    await answerer.close()


async def test_the_end_of_the_other_side_fails_what_waits_and_is_reported() -> None:
    gone: list[str] = []
    never = asyncio.Event()

    async def hang(request: Request) -> group.Reply:
        await never.wait()
        raise AssertionError("unreachable")

    a, b = socket.socketpair()
    asker = await Channel.open(a, refuse, lambda: gone.append("eof"))
    answerer = await Channel.open(b, hang)
    with pytest.raises(GroupError, match="no answer within"):
        await asker.ask(Scrape, Page, 0.05)
    waiting = asyncio.ensure_future(asker.ask(Scrape, Page, 30))
    await asyncio.sleep(0)  # the request is out
    await answerer.close()
    with pytest.raises(GroupError, match="closed"):
        await waiting
    assert gone == ["eof"] and asker.closed.is_set()
    with pytest.raises(GroupError, match="closed"):
        asker.send(Scrape(9))
    await asker.close()
    assert gone == ["eof"]  # closing on purpose tells nobody


@dataclass
class Worker:
    metrics: Metrics
    directory: Directory
    sharing: Sharing
    link: WorkerLink


@pytest.fixture
async def hub() -> AsyncIterator[GroupHub]:
    h = GroupHub(3)
    yield h
    for channel in h.channels():
        await channel.close()


async def join(hub: GroupHub, index: int, ready: bool = True) -> Worker:
    """A worker's end and the supervisor's end of one socket pair, as cli.Supervisor and cli.serve make them."""
    ours, theirs = socket.socketpair()
    hub.join(index, await Channel.open(ours, hub.handler(index)))
    metrics, directory = Metrics(), Directory([(BOB, "pw"), (ALICE, "pw")])
    sharing = Sharing(directory, None)
    link = WorkerLink(metrics.registry, sharing)
    await link.connect(theirs, lambda: None)
    metrics.gather = link.page
    sharing.announce = link.announce
    if ready:
        link.ready(f"node-{index}")
        hub.mark_ready(index)
    return Worker(metrics, directory, sharing, link)


async def test_any_worker_s_scrape_is_the_page_of_the_group(hub: GroupHub) -> None:
    one, two = await join(hub, 1), await join(hub, 2)
    one.metrics.connections.inc(3)
    two.metrics.connections.inc(4)
    one.metrics.message_in()
    two.metrics.upgrades.labels("ok").inc(2)
    for worker in (one, two):
        got = values(await worker.metrics.exposition())
        assert got["gateway_connections_open"] == 7
        assert got["gateway_messages_in_total"] == 1 and got["gateway_upgrades_total{outcome=ok}"] == 2
        assert got["gateway_workers"] == 3 and got["gateway_workers_answered"] == 2
        assert got["gateway_worker_restarts_total"] == 0
    await one.link.close()
    await two.link.close()


async def test_a_dead_worker_s_counts_stay_counted_its_gauges_do_not(hub: GroupHub) -> None:
    one, two = await join(hub, 1), await join(hub, 2)
    one.metrics.connections.inc(3)
    one.metrics.message_in()
    two.metrics.message_in()
    assert values(await two.metrics.exposition())["gateway_messages_in_total"] == 2
    one.metrics.message_in()  # after the last scrape: lost with the process
    await one.link.close()  # worker 1 dies; the supervisor sees its process end and restarts it
    channel = hub.leave(1)
    assert channel is not None
    await channel.close()
    hub.restarts += 1
    again = await join(hub, 1)
    again.metrics.message_in()
    got = values(await two.metrics.exposition())
    assert got["gateway_messages_in_total"] == 3  # 1 retired + 1 of worker 2 + 1 of the new worker 1
    assert got["gateway_connections_open"] == 0
    assert got["gateway_worker_restarts_total"] == 1 and got["gateway_workers_answered"] == 2
    await again.link.close()
    await two.link.close()


async def test_a_late_worker_counts_with_its_last_counters(hub: GroupHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group, "COLLECT_TIMEOUT", 0.2)
    one = await join(hub, 1)
    ours, theirs = socket.socketpair()
    stuck = asyncio.Event()
    late = Metrics()
    late.message_in()

    async def answer_until_stuck(request: Request) -> group.Reply:
        if stuck.is_set():
            await asyncio.Event().wait()  # never answers again
        assert isinstance(request, Collect)
        return Figures(request.id, figures(late.registry))

    hub.join(2, await Channel.open(ours, hub.handler(2)))
    hub.mark_ready(2)
    worker_end = await Channel.open(theirs, answer_until_stuck)
    late.connections.inc(5)
    assert values(await one.metrics.exposition())["gateway_connections_open"] == 5
    stuck.set()
    got = values(await one.metrics.exposition())
    assert got["gateway_messages_in_total"] == 1  # as last seen
    assert got["gateway_connections_open"] == 0  # its gauges are not vouched for
    assert got["gateway_workers_answered"] == 1
    await worker_end.close()
    await one.link.close()


async def test_a_delegation_reaches_every_other_worker_before_the_call_returns(hub: GroupHub) -> None:
    one, two = await join(hub, 1), await join(hub, 2)
    starting = await join(hub, 3, ready=False)  # its process runs but has not loaded the grants yet
    told = asyncio.ensure_future(one.sharing.grant(ALICE, BOB))
    async with asyncio.timeout(5):
        while len(two.directory.accounts_for(BOB)) < 2:  # poll: worker 2 applies it
            await asyncio.sleep(0.01)
    # Worker 3 answers only once it has loaded the grants (ready): until then the call waits for it.
    assert not told.done()
    assert len(starting.directory.accounts_for(BOB)) == 1
    starting.link.ready("node-3")
    hub.mark_ready(3)
    assert await told is True
    for worker in (one, two, starting):
        assert [a.owner for a in worker.directory.accounts_for(BOB)] == [BOB, ALICE]
    for worker in (one, two, starting):
        await worker.link.close()


async def test_a_worker_without_its_supervisor_answers_503() -> None:
    ours, theirs = socket.socketpair()
    metrics = Metrics()
    link = WorkerLink(metrics.registry, None)
    await link.connect(theirs, lambda: None)
    metrics.gather = link.page
    ours.close()
    with pytest.raises(Unavailable, match="cannot be gathered"):
        await metrics.exposition()
    await link.close()


class Held:
    """A worker's end whose answers to Collect are computed at once (as a WorkerLink does) and released on demand."""

    def __init__(self, hub: GroupHub, index: int) -> None:
        self.hub, self.index = hub, index
        self.metrics = Metrics()
        self.held: list[asyncio.Event] = []
        self.asked = 0
        self.stuck = False

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        self.hub.join(self.index, await Channel.open(ours, self.hub.handler(self.index)))
        self.hub.mark_ready(self.index)
        self.end = await Channel.open(theirs, self.answer)

    async def answer(self, request: Request) -> group.Reply:
        assert isinstance(request, Collect)
        reply = Figures(request.id, figures(self.metrics.registry))  # the figures of this moment
        self.asked += 1
        release = asyncio.Event()
        self.held.append(release)
        if self.stuck:
            await asyncio.Event().wait()
        await release.wait()
        return reply

    async def wait_asked(self, n: int) -> None:
        async with asyncio.timeout(5):
            while self.asked < n:  # poll: the Collect has reached this end
                await asyncio.sleep(0.01)


async def test_an_older_answer_arriving_last_does_not_make_the_counters_go_back(
        hub: GroupHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group, "COLLECT_TIMEOUT", 0.2)
    worker = Held(hub, 1)
    await worker.start()
    worker.metrics.message_in()
    first = asyncio.ensure_future(hub.page())  # e.g. two Prometheus servers scraping at once
    await worker.wait_asked(1)
    worker.metrics.message_in()
    second = asyncio.ensure_future(hub.page())
    await worker.wait_asked(2)
    worker.held[1].set()
    assert values(await second)["gateway_messages_in_total"] == 2
    worker.held[0].set()
    assert values(await first)["gateway_messages_in_total"] == 1  # its own moment's figures
    worker.stuck = True
    assert values(await hub.page())["gateway_messages_in_total"] == 2  # the newest it ever reported
    await worker.end.close()


async def test_a_worker_dying_while_a_page_waits_for_it_is_counted_once(hub: GroupHub) -> None:
    worker, other = Held(hub, 1), await join(hub, 2)
    await worker.start()
    worker.metrics.message_in()
    other.metrics.message_in()
    waiting = asyncio.ensure_future(hub.page())
    await worker.wait_asked(1)
    hub.leave(1)  # its process ended after it computed its figures, before they arrived
    worker.held[0].set()
    assert values(await waiting)["gateway_messages_in_total"] == 2
    await worker.end.close()
    assert values(await hub.page())["gateway_messages_in_total"] == 2  # retired now: once, not twice
    assert values(await hub.page())["gateway_messages_in_total"] == 2
    await other.link.close()
