"""The assembled gateway's own duties around the core: the journal's health and what a crash left open.

Real SQLite files throughout; the gateway's clock is a plain number the test moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from core_builders import bms, inverter
from journal_edits import tamper

from firmware_py import gateway as gateway_module
from firmware_py.assembly import assemble
from firmware_py.config import Config
from firmware_py.core.machine import JOURNAL_HOLD
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchKind,
    DispatchRequest,
    EventEnergy,
    OwnerSettings,
    ReasonCode,
    Verdict,
)
from firmware_py.errors import InputError
from firmware_py.journal import Journal, RecordKind, codec
from firmware_py.journal.steps import StepRecorder, journaled_steps


@contextlib.contextmanager
def another_writer(path: Path) -> Iterator[None]:
    """Another writer holds the journal's lock meanwhile: no write of the gateway's can land."""
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()


def gateway_on(path: Path, clock: list[float]):
    base = Config()
    config = replace(base, can=replace(base.can, interface="virtual", channel=f"gateway-test-{path}"),
                     journal=replace(base.journal, path=str(path), busy_timeout_s=0.05))
    return assemble(config, lambda: clock[0], owner=OwnerSettings(40, 0.0))


def request(n: int, now: float) -> DispatchRequest:
    return DispatchRequest(f"r{n}", "test", DispatchKind.DISCHARGE, 3_000, now, now + 600, received_at=now)


@contextlib.contextmanager
def discharging(path: Path) -> Iterator[tuple[Any, Any]]:
    """A gateway on the journal at `path` serving request r1 at 3 kW from 2 s, its journal written so far:
    (gateway, at), `at(t, *inputs)` moving the clock to t and feeding fresh BMS and inverter data with the
    inputs; closed at the end."""
    clock = [0.0]
    assembly = gateway_on(path, clock)
    gateway = assembly.gateway

    def at(t: float, *inputs):
        clock[0] = t
        return gateway.feed(bms(t), inverter(t), *inputs)

    try:
        at(0.0)
        assert at(0.5, request(1, 0.5)).answer_for("r1").verdict is Verdict.ACCEPTED
        assert at(2.0).command.setpoint_w > 0
        assert gateway.flush_journal() > 0
        yield gateway, at
    finally:
        assembly.close()


async def answer(gateway, n: int, now: float):
    return (await gateway.submit(request(n, now))).reason


def test_a_failing_journal_refuses_dispatch_through_the_core_loses_nothing_and_recovers(tmp_path):
    clock = [0.0]
    assembly = gateway_on(tmp_path / "journal.sqlite", clock)
    gateway = assembly.gateway

    async def main() -> list:
        reasons = [await answer(gateway, 1, 0.0)]  # no data yet: the ordinary refusal
        gateway.flush_journal()
        with another_writer(tmp_path / "journal.sqlite"):  # the next write cannot land
            clock[0] = 1.0
            reasons.append(await answer(gateway, 2, 1.0))
            assert gateway.flush_journal() == 0
            clock[0] = 2.0
            reasons.append(await answer(gateway, 3, 2.0))
        clock[0] = 3.0
        assert gateway.flush_journal() > 0
        reasons.append(await answer(gateway, 4, 3.0))
        return reasons

    try:
        reasons = asyncio.run(main())
        gateway.flush_journal(final=True)
    finally:
        assembly.close()
    assert reasons == [ReasonCode.NO_DATA, ReasonCode.NO_DATA, ReasonCode.JOURNAL, ReasonCode.NO_DATA]
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        assert journal.verify() == []
        requests = [r.payload["id"] for r in journal.records(RecordKind.DISPATCH_REQUEST)]
        answers = [(r.payload["request_id"], r.payload["reason"]) for r in journal.records(RecordKind.DISPATCH_ANSWER)]
    assert requests == ["r1", "r2", "r3", "r4"]  # the ones queued while the journal failed were kept
    assert answers == [("r1", "NO_DATA"), ("r2", "NO_DATA"), ("r3", "JOURNAL_UNAVAILABLE"), ("r4", "NO_DATA")]


def test_the_flush_that_finds_the_journal_writing_again_also_writes_what_the_recovery_step_queued(tmp_path):
    """The write that succeeds again feeds the core its recovery (a step: a transition back, say): those
    records are written by the same flush, not left behind (at a stop they were lost, and reported as
    'journal still failing')."""
    clock = [0.0]
    assembly = gateway_on(tmp_path / "journal.sqlite", clock)
    gateway = assembly.gateway
    try:
        gateway.feed(bms(0.0), inverter(0.0))
        gateway.flush_journal()
        with another_writer(tmp_path / "journal.sqlite"):
            clock[0] = 1.0
            gateway.feed(bms(1.0), inverter(1.0))
            gateway.sample()  # a record to write
            assert gateway.flush_journal() == 0 and gateway.controller.journal_failing()
        clock[0] = 2.0
        assert gateway.flush_journal() > 0
        assert not gateway.controller.journal_failing() and gateway.unwritten() == 0
    finally:
        assembly.close()


def test_events_a_crash_left_open_are_ended_with_the_meter_gap_billed(tmp_path):
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:  # what a run that died mid-event left behind
        journal.append_event(DispatchAnswer.accepted("peak", 10.0))
        journal.append_event(EventEnergy(70.0, "peak", 150.0, 149.0, False, meter_total_wh=1_150.0))
    clock = [500.0]
    assembly = gateway_on(path, clock)
    try:
        assert assembly.gateway.close_open_events(meter_total_wh=1_180.0) == ["peak"]
    finally:
        assembly.close()
    with Journal.open(path, readonly=True) as journal:
        (ended,) = journal.records(RecordKind.DISPATCH_ENDED)
        final = journal.records(RecordKind.EVENT_ENERGY)[-1]
    assert ended.payload["request_id"] == "peak" and ended.at == 500.0
    assert final.payload["final"] is True and final.payload["meter_wh"] == 180.0  # 150 + the 30 Wh gap


def test_a_dispatch_source_reads_back_the_energy_and_notes_earlier_runs_journaled(tmp_path, caplog):
    """OpenADR 3's restart reads two things back through the gateway: what the journal credits an event
    (the earlier run's account and the meter gap its crash left, as `statement` counts it) and its notes
    of reports the VTN took. An unreadable journal reads as nothing, logged, never as an exception."""
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:  # a run that died mid-event
        journal.append_event(DispatchAnswer.accepted("peak", 10.0))
        journal.append_event(EventEnergy(70.0, "peak", 150.0, 149.0, False, meter_total_wh=1_150.0))
    clock = [500.0]
    assembly = gateway_on(path, clock)
    try:
        gateway = assembly.gateway
        gateway.close_open_events(meter_total_wh=1_180.0)
        gateway.note(RecordKind.OPENADR3_REPORTED, {"event_id": "peak", "intervals": [0, 1]})
        gateway.flush_journal()
        assert gateway.journaled_wh("peak") == 180.0  # 150 + the 30 Wh gap
        assert gateway.journaled_wh("never-served") == 0.0
        assert gateway.journal_notes(RecordKind.OPENADR3_REPORTED, 3_600.0) == [
            {"event_id": "peak", "intervals": [0, 1]}]
        tamper(path, ("UPDATE records SET payload = '{' WHERE kind IN (?, ?)",
                      (RecordKind.EVENT_ENERGY.value, RecordKind.OPENADR3_REPORTED.value)))  # a bad sector
        assert gateway.journaled_wh("peak") == 0.0
        assert gateway.journal_notes(RecordKind.OPENADR3_REPORTED, 3_600.0) == []
    finally:
        assembly.close()
    assert "the journal's energy for peak could not be read" in caplog.text
    assert "OpenAdr3Reported notes could not be read" in caplog.text


def test_a_record_whose_payload_is_damaged_is_skipped_at_start_and_never_stops_it(tmp_path, caplog):
    """Bit rot in one row's payload (not JSON any more) made the start-up's read of open events raise,
    so `run` exited on every start and systemd restarted it for ever. The start skips the row, logs its
    seq once (never its contents) and ends the open events; `report`/`check` still flag the row."""
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:
        journal.append_event(request(1, 0.0))
        journal.append_event(DispatchAnswer.accepted("peak", 10.0))
        journal.append_event(EventEnergy(70.0, "peak", 150.0, 149.0, False, meter_total_wh=1_150.0))
    tamper(path, ("UPDATE records SET payload = '{\"id\": \"private-note' WHERE seq = 1", ()))  # a bad sector
    clock = [500.0]
    assembly = gateway_on(path, clock)
    try:
        assert assembly.gateway.close_open_events(meter_total_wh=1_180.0) == ["peak"]
        assembly.gateway.close_open_events(None, "gateway stopped: event ended")  # the stop reads again
    finally:
        assembly.close()
    skipped = [r.getMessage() for r in caplog.records if "journal record 1 skipped" in r.getMessage()]
    assert len(skipped) == 1 and "private-note" not in caplog.text
    with Journal.open(path, readonly=True) as journal:
        assert journal.verify() != []  # `check` flags it
        with pytest.raises(InputError, match="record 1: payload is not valid JSON"):
            journal.records()  # and every reading but the start's still refuses it
        (ended,) = [r for r in journal.iter_records([RecordKind.DISPATCH_ENDED], damaged=lambda seq: None)]
    assert ended.payload["request_id"] == "peak" and ended.payload["reason"].startswith("gateway restarted")


def test_a_running_discharge_holds_at_zero_while_the_journal_fails_and_every_answer_lands_after(tmp_path):
    """Energy the gateway cannot account for is not delivered: with the journal locked by another
    writer, the event running at 3 kW drops to 0 W (the core's reason says why), a change of
    request is refused JOURNAL_UNAVAILABLE, and once the journal writes again every request,
    answer and transition of the outage is in it and the event resumes."""
    path = tmp_path / "journal.sqlite"
    with discharging(path) as (gateway, at):
        with another_writer(path):  # the journal cannot take a write from here on
            t = 2.0
            while not any(isinstance(e, EventEnergy) for e in at(t).events):  # a minute on, its energy record is due
                t += 1.0
                assert t < 200, "no energy record in the event's first minutes"
            assert gateway.command.setpoint_w > 0
            assert gateway.flush_journal() == 0  # failed: the records stay queued, the core hears of it
            held = (0.0, f"{JOURNAL_HOLD}: {gateway.controller.journal.detail}")
            assert (gateway.command.setpoint_w, gateway.command.reason) == held
            changed = at(t + 1, replace(request(2, t + 1), target_w=5_000))
            assert changed.answer_for("r2").reason is ReasonCode.JOURNAL
            for later in (t + 2, t + 3):
                assert at(later).command.setpoint_w == 0
                assert gateway.flush_journal() == 0
        assert gateway.flush_journal() > 0  # everything queued lands; the core hears the journal is back
        assert at(t + 4).command.setpoint_w > 0
        gateway.flush_journal(final=True)
    with Journal.open(path, readonly=True) as journal:
        assert journal.verify() == []
        requests = [r.payload["id"] for r in journal.records(RecordKind.DISPATCH_REQUEST)]
        answers = [(r.payload["request_id"], r.payload["reason"]) for r in journal.records(RecordKind.DISPATCH_ANSWER)]
        moves = [(r.payload["from_state"], r.payload["to_state"], r.payload["reason"])
                 for r in journal.records(RecordKind.TRANSITION)]
        ended = journal.records(RecordKind.DISPATCH_ENDED)
        energies = journal.records(RecordKind.EVENT_ENERGY)
    assert requests == ["r1", "r2"]
    assert answers == [("r1", None), ("r2", "JOURNAL_UNAVAILABLE")]
    assert any(to == "STANDBY" and why.startswith(JOURNAL_HOLD) for _, to, why in moves)
    assert moves[-1][:2] == ("STANDBY", "DISCHARGE")  # resumed
    assert not ended  # held, never ended: its energy records go on in one account
    assert {r.payload["request_id"] for r in energies} == {"r1"}
    # the periodic one queued, one when the hold stopped the event, and one when it was served again
    assert [r.at for r in energies if r.at >= t] == [t, t, t + 3]  # the step the journal came back


def test_a_full_disk_refuses_dispatch_loses_nothing_and_recovers_when_space_returns(tmp_path):
    """SQLite's own "database or disk is full" (its page limit reached, as a full disk gives it)."""
    clock = [0.0]
    assembly = gateway_on(tmp_path / "journal.sqlite", clock)
    gateway = assembly.gateway
    conn = gateway.journal._conn  # the gateway's own connection: the limit must bind its writes

    async def main() -> list:
        reasons = [await answer(gateway, 1, 0.0)]
        gateway.flush_journal()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full: no page more
        for n in range(2, 40):  # enough records to need a new page
            clock[0] = float(n)
            reasons.append(await answer(gateway, n, float(n)))
            if gateway.flush_journal() == 0:
                break
        clock[0] += 1
        reasons.append(await answer(gateway, 100, clock[0]))
        conn.execute("PRAGMA max_page_count = 1073741823")  # space returns
        clock[0] += 1
        assert gateway.flush_journal() > 0
        reasons.append(await answer(gateway, 101, clock[0]))
        return reasons

    try:
        reasons = asyncio.run(main())
        gateway.flush_journal(final=True)
    finally:
        assembly.close()
    assert ReasonCode.JOURNAL in reasons and reasons[-1] is ReasonCode.NO_DATA  # refused while full, then not
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        assert journal.verify() == []
        requests = [r.payload["id"] for r in journal.records(RecordKind.DISPATCH_REQUEST)]
    assert "r100" in requests and "r101" in requests and len(requests) == len(reasons)  # nothing queued lost


def test_a_journal_write_cancelled_before_a_worker_took_it_is_still_written_once(tmp_path):
    """A stop cancels the flush task while its write waits for a free worker thread (a busy machine):
    the records it took from the queue must still reach the journal, once, not vanish."""
    clock = [0.0]
    path = tmp_path / "journal.sqlite"
    assembly = gateway_on(path, clock)
    gateway = assembly.gateway

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        busy = threading.Event()
        occupied = loop.run_in_executor(None, busy.wait)  # the only worker is taken
        await answer(gateway, 1, 0.0)  # a request and its answer queued for the journal
        flush = asyncio.create_task(gateway.flush_journal_async())
        for _ in range(3):
            await asyncio.sleep(0)  # the flush has handed its write to the pool and waits
        flush.cancel()
        busy.set()
        await asyncio.gather(occupied, flush, return_exceptions=True)
        assert flush.cancelled()
        gateway.flush_journal(final=True)  # what the stop does next

    try:
        asyncio.run(main())
    finally:
        assembly.close()
    with Journal.open(path, readonly=True) as journal:
        kinds = [str(r.kind) for r in journal.records()]
    assert kinds.count("DispatchRequest") == 1 and kinds.count("DispatchAnswer") == 1


def test_at_a_stop_a_failing_journal_steps_no_core_and_is_tried_once(tmp_path):
    """Once the stop began (`begin_stop`: the inputs ended) the journal's failure is fed to no step (a step
    then would judge the stopped BMS and inverter data stale and journal faults the stop caused), and after
    that failure no other write is attempted (each would wait the busy timeout, in systemd's stop timeout):
    what stays queued is counted for the report, and nothing is stepped."""
    clock = [0.0]
    assembly = gateway_on(tmp_path / "journal.sqlite", clock)
    gateway = assembly.gateway
    try:
        gateway.feed(bms(0.0), inverter(0.0))
        gateway.flush_journal()
        stepped_at, mode = gateway.controller.last_step_at, gateway.controller.mode
        gateway.begin_stop()
        with another_writer(tmp_path / "journal.sqlite"):
            clock[0] = 10.0  # past the inverter's and the BMS's timeouts
            gateway.sample()
            assert gateway.flush_journal(final=True) == 0
            batches = []
            batch = gateway.journal.batch
            gateway.journal.batch = lambda: batches.append(1) or batch()
        gateway.close_open_events(None, "gateway stopped: event ended")
        assert gateway.flush_journal(final=True) == 0 and batches == []  # not tried again
        assert gateway.unwritten() > 0
        assert gateway.controller.last_step_at == stepped_at and gateway.controller.mode is mode
        assert not gateway.controller.journal_failing()
    finally:
        assembly.close()


def bounded_gateway(tmp_path: Path, clock: list[float], batch_steps: int) -> tuple[Any, list[Any]]:
    """A gateway on its own journal whose backlog keeps 3 batches of steps and 2 samples while writes fail;
    with the list every step's result is appended to."""
    assembly = gateway_on(tmp_path / "journal.sqlite", clock)
    assembly.gateway.steps = StepRecorder(batch_steps=batch_steps)
    assembly.gateway.backlog.bounds = {RecordKind.CORE_STEPS: 3, RecordKind.SAMPLE: 2}
    stepped: list[Any] = []
    assembly.gateway.observers.append(stepped.append)
    return assembly, stepped


def after_one_gap(path: Path) -> tuple[list[Any], dict[str, Any], list[dict[str, Any]]]:
    """The journal's records (its chain verified), its one JournalGap's payload, and the batches of steps kept."""
    with Journal.open(path, readonly=True) as journal:
        assert journal.verify() == []
        records = journal.records()
    (gap,) = [r.payload for r in records if r.kind == RecordKind.JOURNAL_GAP]
    return records, gap, [r.payload for r in records if r.kind == RecordKind.CORE_STEPS]


def test_while_the_journal_fails_for_long_steps_and_samples_are_bounded_and_a_gap_says_what_is_missing(tmp_path):
    """A failure lasting days must not fill the gateway's memory with the bulk that grows with time alone
    (a batch of core steps a minute, a history sample a minute): past their bound they are dropped, while
    every request and answer is kept, and once writes work again one JournalGap says what is missing.
    A replay of the run ends at the gap (the steps after it follow steps nobody has)."""
    clock = [0.0]
    assembly, stepped = bounded_gateway(tmp_path, clock, batch_steps=5)
    gateway = assembly.gateway

    async def fail_for_long() -> int:
        gateway.feed(bms(0.0), inverter(0.0))
        gateway.flush_journal()
        with another_writer(tmp_path / "journal.sqlite"):
            most = 0
            for n in range(1, 201):
                clock[0] = float(n)
                gateway.feed(bms(clock[0]), inverter(clock[0]))
                if n % 10 == 0:
                    gateway.sample()
                    await answer(gateway, n, clock[0])
                    gateway.flush_journal()
                most = max(most, gateway.unwritten())
        clock[0] += 1
        assert gateway.flush_journal() > 0 and gateway.unwritten() == 0
        return most

    try:
        most = asyncio.run(fail_for_long())
        gateway.flush_journal(final=True)
    finally:
        assembly.close()
    # 200 steps in 40 batches and 20 samples would have waited; 3 batches and 2 samples did, beside the requests
    assert most <= 3 + 2 + 1 + 20 * 2 + 10  # steps, samples, the gap, 20 requests and answers, a few transitions
    records, gap, kept_steps = after_one_gap(tmp_path / "journal.sqlite")
    assert gap["samples"] == 18 and gap["step_batches"] >= 35
    assert sum(b["count"] for b in kept_steps) + gap["steps"] == len(stepped)  # every step kept or counted
    assert [r.payload["id"] for r in records if r.kind == RecordKind.DISPATCH_REQUEST] == \
        [f"r{n}" for n in range(10, 201, 10)]  # every request kept
    found = list(journaled_steps(records))
    assert [what for what, _ in found if what != "step"] == ["start", "gap"]
    replayable = [one for what, one in found if what == "step"]
    assert replayable and replayable[-1][0] < gap["from"]  # the replay ends where the gap begins


def test_the_bound_holds_while_each_failed_write_waits_on_the_lock_and_what_came_meanwhile_is_counted(tmp_path):
    """In `run` the write goes to a thread and waits the busy timeout on a locked journal; the minute's
    sample and batch of steps arrive meanwhile. The taken records still count against the bound while in
    flight and are not counted twice when put back: else the bound never held and memory grew for as long
    as the failure lasted, with no JournalGap. Every step and sample is kept or counted in one gap."""
    clock = [0.0]
    assembly, stepped = bounded_gateway(tmp_path, clock, batch_steps=1)
    gateway = assembly.gateway

    async def fail_while_writing() -> int:
        gateway.feed(bms(0.0), inverter(0.0))
        gateway.flush_journal()
        with another_writer(tmp_path / "journal.sqlite"):
            most = 0
            for n in range(1, 41):
                clock[0] = float(n)
                flush = asyncio.ensure_future(gateway.flush_journal_async())
                await asyncio.sleep(0)  # the task has taken the queue; its write waits on the lock in a thread
                gateway.sample()
                gateway.feed(bms(clock[0]), inverter(clock[0]))  # a step: a batch of one
                assert await flush == 0
                most = max(most, gateway.unwritten())
        clock[0] += 1
        assert gateway.flush_journal() > 0 and gateway.unwritten() == 0  # and what the recovery step queued
        return most

    try:
        most = asyncio.run(fail_while_writing())
        gateway.flush_journal(final=True)
    finally:
        assembly.close()
    assert most <= 3 + 2 + 1 + 10  # steps, samples, the gap, a few transitions (not 2 a cycle: 80)
    records, gap, kept_steps = after_one_gap(tmp_path / "journal.sqlite")
    assert sum(b["count"] for b in kept_steps) + gap["steps"] == len(stepped)  # every step kept or counted
    assert sum(1 for r in records if r.kind == RecordKind.SAMPLE) + gap["samples"] == 40


def test_a_backlog_larger_than_the_free_space_is_written_in_chunks_as_space_allows(tmp_path):
    """A long failure queued far more than the freed disk can take in one transaction (a site controller
    re-sending meanwhile). Written as one, it would fail and roll back for ever, writing nothing; in
    chunks of their own transaction, the chunks that fit are kept and the rest waits in the queue, in
    order, none lost or written twice; dispatch stays held until the whole backlog is written."""
    clock = [0.0]
    path = tmp_path / "journal.sqlite"
    assembly = gateway_on(path, clock)
    gateway = assembly.gateway
    conn = gateway.journal._conn  # the gateway's own connection: the limit must bind its writes

    def text(item: Any) -> tuple[str, Any]:  # a queued item as the journal keeps it
        if isinstance(item, tuple):
            return str(item[0]), item[2]
        return str(RecordKind.of(item)), codec.jsonable(item)

    async def main() -> dict[str, Any]:
        await answer(gateway, 0, 0.0)
        gateway.flush_journal()
        head = gateway.journal.records()[-1].seq
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full: no page more
        for n in range(1, 2_000):  # the failure goes on; requests keep coming, each refused and kept
            clock[0] = float(n)
            await answer(gateway, n, float(n))
            if n % 100 == 0:
                assert gateway.flush_journal() == 0
        assert gateway.controller.journal_failing()
        queued = [text(item) for item in gateway.backlog._items]
        assert len(queued) > 10 * gateway_module.WRITE_CHUNK
        conn.execute(f"PRAGMA max_page_count = {pages + 40}")  # some space returns, not enough for all
        first = gateway.flush_journal()
        held = gateway.controller.journal_failing()
        rest = [text(item) for item in gateway.backlog._items]
        conn.execute("PRAGMA max_page_count = 1073741823")  # space returns
        clock[0] += 1
        second = gateway.flush_journal()
        return {"queued": queued, "rest": rest, "head": head, "first": first, "held": held, "second": second}

    try:
        seen = asyncio.run(main())
        queued, rest, head, first, held, second = seen.values()
        failing_after = gateway.controller.journal_failing()
        gateway.flush_journal(final=True)
    finally:
        assembly.close()
    assert 0 < first < len(queued)  # the chunks that fit are written, not all-or-nothing
    assert rest == queued[first:]  # the rest still queued, in order, none lost or duplicated
    assert rest[0][0] != "DispatchAnswer"  # a request and its answer are never cut apart
    assert held and not failing_after  # held while part of the backlog waited; resumed once all was written
    with Journal.open(path, readonly=True) as journal:
        assert journal.verify() == []
        kept = [(str(r.kind), r.payload) for r in journal.records(since_seq=head)]
    assert kept[:len(queued)] == queued  # exactly the queued records, in order
    assert second >= len(queued) - first


@pytest.mark.parametrize("lost_s", [0, 2])
def test_a_stop_mid_event_closes_it_with_the_live_integral_not_the_last_report(tmp_path, lost_s):
    """A clean stop 20 s into an event at 3 kW ended it from the journal's last record (the event's opening
    one: integrated 0 Wh) with only the meter's gap added, so `report` and `statement` saw meter and integral
    far apart and a wrong average. The core that served the event closes it from its live account; the
    meter read at the stop adds the gap since its last good poll to the meter and the integral (no power was
    read meanwhile), also when the link was lost for the last `lost_s` (the inverter running on at its
    setpoint: that energy was once billed to no one)."""
    path = tmp_path / "journal.sqlite"
    clock = [0.0]
    assembly = gateway_on(path, clock)
    gateway = assembly.gateway
    meter = [1_000.0]

    def at(t: float, watts: float, *inputs, comms_ok: bool = True):
        clock[0] = t
        return gateway.feed(bms(t), inverter(t, measured_w=watts, tot_wh_inj=meter[0], comms_ok=comms_ok), *inputs)

    try:
        at(0.0, 0.0)
        assert at(0.5, 0.0, request(1, 0.5)).answer_for("r1").verdict is Verdict.ACCEPTED
        at(1.0, 0.0)
        gateway.flush_journal()
        for t in range(2, 23):  # 21 s served at 3 kW, the meter counting it
            meter[0] += 3_000 / 3_600
            at(float(t), 3_000.0)
        for t in range(23, 23 + lost_s):  # the link lost; the inverter runs on at 3 kW
            meter[0] += 3_000 / 3_600
            at(float(t), 0.0, comms_ok=False)
        gateway.begin_stop()
        clock[0] = 23.0 + lost_s
        assert gateway.close_open_events(meter[0] + 1.0, "gateway stopped: event ended") == ["r1"]
        gateway.flush_journal(final=True)
    finally:
        assembly.close()
    with Journal.open(path, readonly=True) as journal:
        (ended,) = journal.records(RecordKind.DISPATCH_ENDED)
        final = journal.records(RecordKind.EVENT_ENERGY)[-1].payload
    assert ended.payload == {**ended.payload, "request_id": "r1", "reason": "gateway stopped: event ended"}
    assert final["final"] is True
    gap = lost_s * 3_000 / 3_600 + 1.0  # the stop's read: 1 Wh more
    assert final["integrated_wh"] == pytest.approx(3_000 * 20 / 3_600 + 1_500 / 3_600 + gap, abs=0.01)  # 17.08 Wh + gap
    assert final["meter_wh"] == pytest.approx(21 * 3_000 / 3_600 + gap, abs=0.01)
    assert final["meter_total_wh"] == pytest.approx(meter[0] + 1.0)


def test_a_stop_closes_an_event_an_earlier_run_left_open_by_the_restart_rule(tmp_path):
    """An open event this run's core never served (its start could not close it) still closes from the
    journal's last record, with the meter's gap billed."""
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as journal:
        journal.append_event(DispatchAnswer.accepted("peak", 10.0))
        journal.append_event(EventEnergy(70.0, "peak", 150.0, 149.0, False, meter_total_wh=1_150.0))
    clock = [500.0]
    assembly = gateway_on(path, clock)
    try:
        assembly.gateway.begin_stop()
        assert assembly.gateway.close_open_events(1_180.0, "gateway stopped: event ended") == ["peak"]
    finally:
        assembly.close()
    with Journal.open(path, readonly=True) as journal:
        final = journal.records(RecordKind.EVENT_ENERGY)[-1].payload
    assert final["final"] is True and final["meter_wh"] == 180.0 and final["integrated_wh"] == 179.0  # the gap in both
