"""Two clocks (issue 10, item 2): a wall-clock step during an event changes nothing that matters.

A board without a real-time clock boots with a wrong date that NTP later steps.
The gateway runs its core on the monotonic clock and converts wall instants (an
OpenADR event's window, as received) to it once, at reception. With the wall
clock stepped by −1 h, +1 h and +5 years in the middle of an event, these tests
show on the real assembled gateway (virtual CAN bus, Modbus TCP inverter, SQLite
journal) that:
- the event runs exactly its window: not stopped early, not extended;
- stale data is not hidden: a silent BMS faults after the same monotonic timeout;
- no energy record is lost: one per report interval and the final one, and the
  final record matches the inverter's meter;
- the journal stamps every record on both clocks, and `report` shows wall time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import math

import pytest
from lockstep import Rig, TestClocks

from firmware_py.cli import main as cli
from firmware_py.clocks import Clocks, calendar_day
from firmware_py.core import Mode
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchEnded,
    EventEnergy,
    FaultKind,
    FaultRaised,
    OwnerSettings,
    Verdict,
)
from firmware_py.dispatch.openadr_events import (
    LOAD_DISPATCH,
    EventPlan,
    translate_event,
)
from firmware_py.journal import Journal, RecordKind, event_summaries

HOUR, YEARS_5 = 3_600.0, 5 * 365.25 * 86_400
EVENT_S = 130.0  # two energy report intervals and a bit
LEAD_S = 5.0
TARGET_KW = 5.0


def openadr_event(start: dt.datetime) -> dict:
    """One LOAD_DISPATCH interval as openleadr hands it to the VEN: its window in UTC."""
    return {"event_descriptor": {"event_id": "peak", "modification_number": 0, "event_status": "far"},
            "active_period": {"dtstart": start, "duration": dt.timedelta(seconds=EVENT_S)},
            "event_signals": [{"signal_name": LOAD_DISPATCH, "signal_type": "setpoint",
                               "intervals": [{"duration": dt.timedelta(seconds=EVENT_S),
                                              "signal_payload": TARGET_KW, "uid": 0}]}]}


async def receive_event(rig: Rig) -> EventPlan:
    """What the VEN does on arrival: the UTC window onto the core's base, through the gateway's clocks."""
    start = dt.datetime.fromtimestamp(rig.time.wall() + LEAD_S, dt.UTC)
    plan = translate_event(openadr_event(start), rating_w=11_500, levels_pct=[33, 66, 100],
                           to_gateway_time=rig.gateway.clocks.from_datetime, received_at=rig.gateway.now())
    assert isinstance(plan, EventPlan)
    (request,) = plan.requests
    answer = await rig.gateway.submit(request)
    assert answer is not None and answer.verdict is Verdict.ACCEPTED, answer
    return plan


@pytest.mark.parametrize("wall_step_s", [-HOUR, HOUR, YEARS_5], ids=["-1h", "+1h", "+5y"])
def test_a_wall_clock_step_during_an_event(tmp_path, wall_step_s):
    async def main() -> None:
        async with Rig(tmp_path) as rig:
            await rig.run(3.0)
            assert rig.gateway.controller.mode is Mode.STANDBY
            (request,) = (await receive_event(rig)).requests
            assert request.end - request.start == pytest.approx(EVENT_S)
            await rig.run(LEAD_S + 40.0)
            assert rig.gateway.controller.mode is Mode.DISCHARGE

            rig.time.step_wall(wall_step_s)  # NTP steps the wall clock mid-event
            stepped_at = rig.time.mono

            # Stale data is not hidden (a step back) nor invented (a step forward): the BMS falls
            # silent and the fault comes after the same monotonic timeout as ever.
            rig.bms_on = False
            await rig.run(0.2)
            assert not rig.events(FaultRaised)
            await rig.run(0.3)
            (stale,) = rig.events(FaultRaised)
            assert stale.kind is FaultKind.BMS_STALE and stale.at - stepped_at == pytest.approx(0.4, abs=0.11)
            assert rig.gateway.command.setpoint_w == 0
            rig.bms_on = True

            # The event neither stops at once nor runs past its window: it ends at its end.
            await rig.run(request.end - rig.time.mono - 0.5)
            assert rig.gateway.controller.serving_id == "peak" and not rig.events(DispatchEnded)
            await rig.run(1.0)
            (ended,) = rig.events(DispatchEnded)
            assert ended.reason == "window closed" and ended.at == pytest.approx(request.end, abs=0.11)

        energy = rig.events(EventEnergy)
        # One at the start, one when the stale BMS stopped the event and one when it was served again
        # (each with the meter reading a restart bills from), a report interval on, then the final one:
        # none lost to the step.
        assert [e.final for e in energy] == [False, False, False, False, True]
        assert all(e.meter_total_wh is not None for e in energy)
        assert [round(b.at - a.at) for a, b in itertools.pairwise(energy[2:-1])] == [60]
        final = energy[-1]
        assert final.meter_wh > 0 and final.meter_wh == pytest.approx(final.integrated_wh, rel=0.02)

        with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
            assert journal.verify() == []
            records = journal.records()
            (summary,) = event_summaries(journal)
        kept = [r for r in records if r.kind == RecordKind.EVENT_ENERGY]
        assert len(kept) == len(energy) and kept[-1].payload["final"]
        # Each record on both clocks: the core's base for replay, the wall as it was for people.
        offsets = {round(r.wall - r.at) for r in records if r.kind != RecordKind.CORE_STEPS}
        assert offsets == {round(rig.time.offset - wall_step_s), round(rig.time.offset)}
        assert summary.start == pytest.approx(request.start + rig.time.offset - wall_step_s, abs=0.01)
        assert summary.final and summary.meter_wh == final.meter_wh
        statement_line_is_on_the_core_clock(tmp_path, request.end - request.start, summary.start)

    asyncio.run(main())


def statement_line_is_on_the_core_clock(tmp_path, window_s: float, start_wall: float) -> None:
    """The statement's line for the event: the window it ran (not stretched or shrunk by the step, which once
    gave a window of 0 s and no SoC drop, or 1.5 h and a third of the power), every one of its samples, and
    a statement that verifies."""
    out = tmp_path / "statement.json"
    assert cli(["statement", "--journal", str(tmp_path / "journal.sqlite"), "--event", "peak",
                 "--format", "json", "--out", str(out)]) == 0
    (line,) = json.loads(out.read_text())["events"]
    lo, hi = (dt.datetime.fromisoformat(line["window"][end]).timestamp() for end in ("from", "to"))
    assert lo == pytest.approx(start_wall, abs=0.01) and hi - lo == pytest.approx(window_s, abs=0.11)
    assert line["avg_w"] == pytest.approx(line["integrated_wh"] * 3600 / window_s, rel=0.01)
    assert line["peak_w"] == pytest.approx(TARGET_KW * 1000, rel=0.05)
    assert line["soc_end_pct"] < line["soc_start_pct"] and line["throughput_wh"] > 0.5 * line["delivered_wh"] > 0
    assert cli(["statement", "verify", str(out), "--journal", str(tmp_path / "journal.sqlite")]) == 0


def test_an_owner_opt_out_until_a_wall_time_is_kept_in_wall_time_across_a_restart(tmp_path):
    """Settings on disk are wall time; the core gets them on its own base, whatever the boot."""
    from firmware_py.owner.store import OwnerStore, on_clock

    clocks = TestClocks()
    until_wall = clocks.wall() + 600
    store = OwnerStore(tmp_path / "owner.json", 40)
    store.save(OwnerSettings(50, clocks.wall(), opt_out_until=until_wall))
    clocks.mono = 7.0  # a reboot: monotonic time starts again, the wall clock goes on
    clocks.offset = until_wall - 600 + 30 - clocks.mono  # 30 s later on the wall
    core = on_clock(store.load(clocks.wall()), clocks.clocks.to_core)
    assert core.opt_out_until == pytest.approx(clocks.mono + 570)
    assert core.opted_out(clocks.mono + 569) and not core.opted_out(clocks.mono + 571)
    revoked = on_clock(OwnerSettings(50, clocks.wall(), opt_out_until=math.inf), clocks.clocks.to_core)
    assert revoked.opt_out_until == math.inf


def test_an_answer_is_journaled_with_its_wall_time(tmp_path):
    async def main() -> DispatchAnswer:
        async with Rig(tmp_path) as rig:
            await rig.run(2.0)
            plan = await receive_event(rig)
            (answer,) = rig.events(DispatchAnswer)
            assert answer.request_id == plan.requests[0].id
            return answer

    answer = asyncio.run(main())
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        (record,) = journal.records(RecordKind.DISPATCH_ANSWER)
    assert record.at == answer.at < 10_000  # the core's base: monotonic, not the epoch
    assert record.wall == pytest.approx(TestClocks().offset + answer.at)


def test_owner_times_saved_before_a_boot_with_a_wrong_clock_are_placed_again_when_ntp_steps_it(tmp_path, caplog):
    """A board without RTC boots 30 days behind: the saved departure, storm watch and opt-out were placed on
    the core's line with that offset. Once NTP steps the clock, they are at the file's wall times again,
    journaled as an owner input, and a later change saves them unshifted."""
    from firmware_py.owner.desk import CONTROLS, OwnerDesk
    from firmware_py.owner.store import OwnerStore

    lag, true_now = 30 * 86_400.0, TestClocks().wall()
    saved = OwnerSettings(reserve_pct=40, received_at=true_now - 60, storm_watch_floor_pct=80,
                          storm_watch_until=true_now + 86_400, departure_at=true_now + 10 * HOUR,
                          departure_soc_pct=90, opt_out_until=true_now + 2 * HOUR)
    OwnerStore(tmp_path / "owner.json", 40).save(saved)
    clocks = TestClocks(wall_start=true_now - lag)

    async def scenario() -> None:
        async with Rig(tmp_path, clocks) as rig:
            await rig.run(1.0)
            clocks.step_wall(lag)
            with caplog.at_level("WARNING"):
                await rig.run(1.0)
            core, to_core = rig.gateway.owner_settings(), rig.gateway.clocks.to_core
            assert (core.departure_at, core.storm_watch_until, core.opt_out_until) == (
                to_core(saved.departure_at), to_core(saved.storm_watch_until), to_core(saved.opt_out_until))
            assert [r.message for r in caplog.records if "owner's times were placed again" in r.message] == [
                f"the wall clock was corrected by +{lag:.0f} s: the owner's times were placed again "
                f"from {tmp_path / 'owner.json'}"]
            desk = OwnerDesk(rig.gateway, rig.assembly.store, rig.gateway.clocks)
            await desk.set(next(c for c in CONTROLS if c.path == "reserve"), {"pct": 45})
            now_saved = OwnerStore(tmp_path / "owner.json", 40).load()
            assert (now_saved.departure_at, now_saved.storm_watch_until, now_saved.opt_out_until) == (
                saved.departure_at, saved.storm_watch_until, saved.opt_out_until)
            rig.gateway.flush_journal()
        with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
            owner_inputs = journal.recent({RecordKind.OWNER_SETTINGS}, 0.0)
        assert len(owner_inputs) == 2  # the settings placed again, then the reserve change

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("zone, date, hours", [
    ("Europe/Berlin", "2025-03-30", 23), ("Europe/Berlin", "2025-10-26", 25),
    ("America/New_York", "2025-03-09", 23), ("America/New_York", "2025-11-02", 25),
])
def test_the_day_of_a_daylight_saving_change_begins_at_its_own_midnight(local_zone, zone, date, hours):
    """The daily price budget counts by `calendar_day` in the gateway's local zone: each midnight has its
    own offset, so the day of the change is 23 or 25 h long and a restart reads that whole day back."""
    tz = local_zone(zone)
    noon = dt.datetime.fromisoformat(f"{date}T12:00").replace(tzinfo=tz).timestamp()
    day, began, following = calendar_day(noon)
    assert day == date
    assert began == dt.datetime.fromisoformat(f"{date}T00:00").replace(tzinfo=tz).timestamp()
    assert following - began == hours * HOUR
    assert calendar_day(noon, tz) == (day, began, following)


def test_an_instant_set_to_the_second_reads_back_the_same_however_often_it_goes_there_and_back():
    """The owner's departure for 23:00 came back from the core's base as 22:59:59.9999998 (the page said
    "10:59 PM") and moved again with every save: the offset is read anew each time, microseconds apart,
    and the sums round at 1e-7 s. Clocks as a gateway's read: each read later, the wall one jittering."""
    now = [86_400.0]
    jitter = itertools.cycle([0.0, 3e-6, -2e-6, 7.9e-6, -0.7e-6])

    def monotonic() -> float:
        now[0] += 0.0137
        return now[0]

    clocks = Clocks(monotonic, lambda: now[0] + 1_796_400_000.0 + next(jitter))
    departure = dt.datetime(2026, 12, 5, 23, 0, tzinfo=dt.UTC).timestamp()
    wall = departure
    for _ in range(300):  # an owner's unrelated changes, each saving the settings again
        wall = clocks.to_wall(clocks.to_core(wall))
        assert wall == departure
    assert clocks.to_wall(math.inf) == math.inf and math.isnan(clocks.to_wall(math.nan))
