"""The CAN link heals itself (issue 10, item 1), on real python-can buses.

The link is the assembled gateway's own (`Assembly.can_link`): its receive thread
is python-can's Notifier, its bus a `virtual` one shared with a simulated BMS
node in this process. A bus broken under the gateway (closed, as a re-plugged
adapter or a dead remote server leaves it) or a silent one is closed and opened
again, at once the first time, then with a back-off that doubles up to its bound;
a bus that cannot be opened keeps being retried; each outage is logged and
journaled once, and once when it is over. The link's clock is the test's, so the
back-off is checked without waiting for it; frames are waited for as events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import replace

import can
import pytest
from can.interfaces.virtual import VirtualBus
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import BmsNode

from firmware_py.assembly import assemble
from firmware_py.bms.link import CanLink
from firmware_py.bms.reader import reader_from_config
from firmware_py.config import Config, bundled_dbc
from firmware_py.errors import InputError
from firmware_py.journal import Journal, RecordKind

WAIT_S = 10.0


class World:
    """A gateway assembled on a virtual bus, a BMS node on the same channel, a clock the test moves."""

    def __init__(self, tmp_path, channel: str) -> None:
        base = Config()
        self.config = replace(base, can=replace(base.can, interface="virtual", channel=channel),
                              journal=replace(base.journal, path=str(tmp_path / "journal.sqlite")),
                              owner=replace(base.owner, settings_file=str(tmp_path / "owner.json")))
        self.now = 100.0
        self.assembly = assemble(self.config, lambda: self.now)
        self.link = self.assembly.can_link
        self.node_bus = can.Bus(interface="virtual", channel=channel)
        self.node = BmsNode(Battery(), self.node_bus, bundled_dbc("cybertruck_bms.dbc"))
        self.node_t = 0.0  # the node's own clock: it only ever moves on
        self.snapshots = 0
        self.arrived = threading.Event()

    def on_snapshot(self, snapshot) -> None:
        self.snapshots += 1
        self.arrived.set()

    def send(self, seconds: float = 1.0) -> None:
        """The node sends every message due over `seconds` of its own time."""
        for _ in range(int(seconds * 100)):
            self.node_t += 0.01
            self.node.emit_due(self.node_t)

    async def frames_arrive(self) -> None:
        """Until the gateway's receive thread decodes a frame sent from now on (an event, bounded).

        The pack's temperature moves by a degree each time, so the frames carry news: the
        reader hands the core a snapshot only when something it decides on changed.
        """
        self.arrived.clear()
        self.node.battery.temp_c = 26.0 if self.node.battery.temp_c != 26.0 else 25.0
        self.send()
        if not await asyncio.to_thread(self.arrived.wait, WAIT_S):
            raise AssertionError(f"no frame reached the gateway within {WAIT_S} s")
        await self.all_taken()

    async def all_taken(self) -> None:
        """Until the receive thread has taken every frame the node sent (bounded): a backlog still
        being decoded after the test's clock moved on would read as frames arriving later."""
        deadline = time.monotonic() + WAIT_S
        while (taken := self.taken()) < self.node.sent:
            if time.monotonic() > deadline:
                raise AssertionError(f"the gateway took {taken} of the node's {self.node.sent} frames "
                                     f"within {WAIT_S} s")
            await asyncio.sleep(0.001)

    def taken(self) -> int:
        """Frames the reader accepted or dropped. It skips ids its DBC does not know without counting
        them; the node sends only ids from the same DBC, so every frame it sent is counted."""
        accepted, dropped = self.link.reader.frame_counts()
        return accepted + sum(dropped.values())

    async def look(self, after_s: float = 0.1) -> None:
        self.now += after_s
        await self.link.supervise()

    def close(self) -> None:
        self.assembly.close()
        self.node_bus.shutdown()


@pytest.fixture
def world(tmp_path, request):
    w = World(tmp_path, f"can-link-{request.node.name}")
    w.link.start(w.on_snapshot)
    yield w
    w.close()


def link_records(tmp_path) -> list[tuple[str, str]]:
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        return [(r.kind, r.payload["link"]) for r in journal.records()
                if r.kind in (RecordKind.LINK_LOST, RecordKind.LINK_RECOVERED)]


def told_once(caplog) -> None:
    """The BMS link's outage logged once when it began and once when it ended."""
    lines = [r.getMessage() for r in caplog.records if "link" in r.getMessage()]
    assert len([m for m in lines if m.startswith("link lost: bms")]) == 1, lines
    assert len([m for m in lines if m.startswith("link recovered: bms")]) == 1, lines


def test_a_bus_broken_under_the_gateway_is_reopened_and_told_once(world, tmp_path, caplog):
    async def main() -> None:
        await world.frames_arrive()
        await world.look()
        assert world.assembly.gateway.links.view(world.now)["bms"]["ok"]
        broken = world.link.bus
        with caplog.at_level(logging.INFO):
            broken.shutdown()  # what a re-plugged adapter or a dead remote server leaves behind
            assert await asyncio.to_thread(world.link.listener.failed.wait, WAIT_S)  # its receive thread fails
            for _ in range(3):
                await world.look()  # errors and no frames: closed and opened again, once
            assert world.link.reopens == 1 and world.link.bus is not broken
            await world.frames_arrive()
            await world.look()
            await world.frames_arrive()
            await world.look()
        view = world.assembly.gateway.links.view(world.now)["bms"]
        assert view["ok"] and view["age_s"] == 0
        told_once(caplog)
        assert not [r for r in caplog.records if r.exc_info]  # an expected condition: no traceback

    asyncio.run(main())
    world.assembly.gateway.flush_journal()
    assert link_records(tmp_path) == [("LinkLost", "bms"), ("LinkRecovered", "bms")]


def test_a_bus_never_heard_has_no_last_good_data_and_its_outage_is_told_once(world, caplog):
    """No BMS frame since start: the link's age is null (docs: "null: none yet"), not counted from the
    first look, which took the reader's zero counts for frames; the first frame then recovers it."""
    async def main() -> None:
        with caplog.at_level(logging.INFO):
            for _ in range(8):  # 2 s of a silent bus (BMS timeout 0.5 s)
                await world.look(0.25)
            view = world.assembly.gateway.links.view(world.now)["bms"]
            assert view["ok"] is False and view["age_s"] is None, view
            assert view["cause"].startswith("no BMS frame for")
            await world.frames_arrive()
            await world.look()
        view = world.assembly.gateway.links.view(world.now)["bms"]
        assert view["ok"] and view["age_s"] == 0
        told_once(caplog)

    asyncio.run(main())


def test_a_silent_bus_is_reopened_with_a_back_off_that_doubles_to_its_bound(world):
    async def main() -> list[int]:
        await world.frames_arrive()
        await world.look()
        counts = []
        for _ in range(int(120 / 0.25)):  # two minutes of silence, looked at four times a second
            await world.look(0.25)
            counts.append(world.link.reopens)
        return counts

    counts = asyncio.run(main())
    times = [0.25 * (i + 1) for i, (a, b) in enumerate(zip([0] + counts, counts)) if b > a]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    assert times[0] == pytest.approx(0.75)  # the first reopen once the silence outlasts the BMS timeout (0.5 s)
    # Then each reopened bus gets a whole timeout to bring frames, and the back-off doubles: 0.5, 1, 2 ... 30 s.
    assert gaps[:7] == [0.75, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert max(gaps) == 30.0  # bounded
    assert world.assembly.gateway.links.view(world.now)["bms"]["ok"] is False


def test_another_nodes_29_bit_frames_do_not_hide_a_silent_bms(world):
    """A 29-bit frame sharing a BMS id's number is another node's, counted and never read: it counted as the
    BMS's traffic too, so a BMS gone silent beside such a node was never found (no reopen, `status` saying
    the link was good) while its data went stale."""
    async def main() -> None:
        await world.frames_arrive()
        await world.look()
        for n in range(8):  # 2 s of the BMS silent and the other node talking, looked at four times a second
            before = world.link.reader.frame_counts()[1].get("extended_id", 0)
            world.node_bus.send(can.Message(arbitration_id=0x132, is_extended_id=True, data=bytes(8)))
            deadline = time.monotonic() + WAIT_S
            while world.link.reader.frame_counts()[1].get("extended_id", 0) == before:
                assert time.monotonic() < deadline, f"the 29-bit frame {n} never reached the reader"
                await asyncio.sleep(0.001)
            await world.look(0.25)

    asyncio.run(main())
    assert world.link.reopens >= 1
    assert world.assembly.gateway.links.view(world.now)["bms"]["ok"] is False


def test_the_silence_cause_counts_from_the_last_frame_not_the_last_reopen(world):
    """Each reopen gives the bus a whole timeout again, and the cause `status` shows counted from there:
    a bus silent for minutes read "no BMS frame for 0.8 s"."""
    async def main() -> tuple[str, float]:
        await world.frames_arrive()
        await world.look()
        heard_at = world.now
        for _ in range(int(20 / 0.25)):  # 20 s of silence: several reopens on the way
            await world.look(0.25)
        assert world.link.reopens >= 3
        cause = world.assembly.gateway.links.view(world.now)["bms"]["cause"]
        return cause, world.now - heard_at

    cause, silent_s = asyncio.run(main())
    assert cause == f"no BMS frame for {silent_s:.1f} s"


def test_a_bus_that_cannot_be_reopened_keeps_being_retried_and_heals_when_it_can(world):
    async def main() -> None:
        await world.frames_arrive()
        await world.look()
        opener, refusals = world.link._opener, []

        def refusing_opener() -> can.BusABC:
            refusals.append(world.now)
            raise InputError("can: cannot open the virtual bus: adapter unplugged")

        world.link._opener = refusing_opener
        for _ in range(40):
            await world.look(0.25)  # 10 s: silence, then every reopen refused
        assert len(refusals) >= 4 and world.link.bus is None
        view = world.assembly.gateway.links.view(world.now)["bms"]
        assert not view["ok"] and "adapter unplugged" in view["cause"]
        world.link._opener = opener  # plugged back in
        for _ in range(200):  # 50 s: past the longest back-off (30 s)
            if world.link.bus is not None:
                break
            await world.look(0.25)
        assert world.link.bus is not None, "the bus was not reopened once the adapter was back"
        await world.frames_arrive()
        await world.look()
        assert world.assembly.gateway.links.view(world.now)["bms"]["ok"]

    asyncio.run(main())


def test_a_pause_of_the_gateway_itself_is_not_silence(world):
    async def main() -> None:
        await world.frames_arrive()
        await world.look()
        await world.look(4.0)  # a 4 s SIGSTOP between two looks: judged afresh, not reopened
        assert world.link.reopens == 0
        await world.frames_arrive()
        await world.look()
        assert world.link.reopens == 0

    asyncio.run(main())


class _Watched(VirtualBus):
    """A virtual bus that says when it is shut down."""

    def __init__(self, channel: str, closed: threading.Event) -> None:
        super().__init__(channel=channel)
        self.closed = closed

    def shutdown(self) -> None:
        super().shutdown()
        self.closed.set()


def test_a_reopen_whose_open_never_returns_holds_neither_the_close_nor_the_exit(tmp_path):
    """An adapter (or a remote server) that never answers the open: the gateway stopping must not wait
    for it. `close` gives up after its bound; `asyncio.run` returns (asyncio's executor would have held
    it); the bus, when it opens at last, is closed by the reopen itself."""
    channel, now = "can-link-never-opens", [100.0]
    opening, release, late_closed = threading.Event(), threading.Event(), threading.Event()
    config = replace(Config(), journal=replace(Config().journal, path=str(tmp_path / "j.sqlite")))
    buses = iter([can.Bus(interface="virtual", channel=channel)])

    def opener() -> can.BusABC:
        first = next(buses, None)
        if first is not None:
            return first
        opening.set()
        release.wait()  # the driver's open, blocked
        return _Watched(channel, late_closed)

    link = CanLink(opener, reader_from_config(config, lambda: now[0]), lambda: now[0], silence_s=0.5,
                   stall_gap_s=5.0, close_wait_s=0.05)
    link.start(lambda snapshot: None)

    async def stopping_while_it_opens() -> None:
        await link.supervise()  # the first look: the link as it starts
        now[0] += 1.0  # then a silent bus: the next look reopens it
        look = asyncio.create_task(link.supervise())
        assert await asyncio.to_thread(opening.wait, WAIT_S), "the reopen never began"
        look.cancel()  # the service stops
        await asyncio.gather(look, return_exceptions=True)

    exited = threading.Event()
    runner = threading.Thread(target=lambda: (asyncio.run(stopping_while_it_opens()), exited.set()), daemon=True)
    try:
        runner.start()
        assert exited.wait(WAIT_S), "asyncio.run waited for the reopen's open on its way out"
        link.close()  # returns though the open has not
        assert link.bus is None and not late_closed.is_set()
    finally:
        release.set()
    assert late_closed.wait(WAIT_S), "the bus opened after the close was left open"
    assert link.bus is None


def test_a_reopen_that_never_returns_is_abandoned_and_the_next_one_heals_the_link(world, caplog):
    """A remote server that accepts the connection and never answers: the reopen's open blocks for
    good. The link gives up on it after `open_timeout_s`, counts it as a failed open (same back-off,
    the cause told once), reopens the bus on the next attempt once the server answers again, and the
    abandoned attempt's bus, when it opens at last, is shut down rather than leaked."""
    world.link.open_timeout_s = 0.2  # a bounded wait on the wall clock: the open runs in a real thread
    opener, hung, release, late_closed = world.link._opener, threading.Event(), threading.Event(), threading.Event()
    attempts: list[float] = []

    def hanging_once() -> can.BusABC:
        attempts.append(world.now)
        if len(attempts) > 1:
            return opener()  # the server answers again
        hung.set()
        release.wait()  # can_remote's connection, which has no timeout
        return _Watched(world.config.can.channel, late_closed)

    async def look() -> None:
        await asyncio.wait_for(world.look(0.25), WAIT_S)  # bounded: a look that never returns fails here

    async def main() -> None:
        await world.frames_arrive()
        await world.look()
        world.link._opener = hanging_once
        with caplog.at_level(logging.INFO):
            for _ in range(200):  # silence, a reopen that hangs, then one that opens
                if len(attempts) > 1:
                    break
                await look()
            assert hung.is_set() and len(attempts) == 2, attempts
            assert attempts[1] - attempts[0] >= world.link.backoff_min_s  # the timeout was a failed open
            assert world.link.bus is not None
            await world.frames_arrive()
            await look()
        assert world.assembly.gateway.links.view(world.now)["bms"]["ok"]
        lines = [r.getMessage() for r in caplog.records]
        assert len([m for m in lines if m.startswith("link lost: bms")]) == 1, lines
        assert len([m for m in lines if m.startswith("link recovered: bms")]) == 1, lines
        assert len([m for m in lines if "did not open within 0.2 s" in m]) == 1, lines

    try:
        asyncio.run(main())
        assert not late_closed.is_set()
    finally:
        release.set()
    assert late_closed.wait(WAIT_S), "the bus the abandoned reopen opened at last was left open"
    assert world.link.bus is not None and not isinstance(world.link.bus, _Watched)
