"""Per-event energy after a restart: which events the journal shows open, and how they close."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core_builders import POLICY, Run, bms, discharge, inverter, ready
from firmware_py.core import step
from firmware_py.core.energy import close_after_restart, most_unreported_wh, open_events
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    EventEnergy,
    FaultRaised,
    FaultKind,
    ReasonCode,
    Transition,
    Mode,
    OwnerSettings,
)

MOST = most_unreported_wh(POLICY)  # 11.5 kW for 60 + 10 + 3 s


def ok(rid: str, at: float = 0.0) -> DispatchAnswer:
    return DispatchAnswer.accepted(rid, at)


def energy(rid: str, at: float, meter: float, total: float | None = None, integrated: float | None = None):
    return EventEnergy(at=at, request_id=rid, meter_wh=meter,
                       integrated_wh=meter if integrated is None else integrated, meter_total_wh=total)


def test_most_unreported_is_a_report_interval_and_the_revert_time_at_full_power():
    assert MOST == pytest.approx(11_500 * (60 + 10 + 3) / 3600)


E1 = energy("a", 60.0, 100.0, 5_000.0)
STOP = DispatchRequest("stop-1", "agg", DispatchKind.STOP, 0.0, 1.0, 3_600.0, received_at=1.0)
STOP_A = DispatchRequest("a", "agg", DispatchKind.STOP, 0.0, 5.0, 3_600.0, received_at=5.0, revision=1)

OPEN_ROWS = [
    ("nothing journaled", [], {}),
    ("accepted, no energy yet", [ok("a")], {"a": None}),
    ("accepted then energy", [ok("a"), E1], {"a": E1}),
    ("the newest energy record wins", [ok("a"), energy("a", 30, 50.0), E1], {"a": E1}),
    ("ended", [ok("a"), E1, DispatchEnded(90, "a", "window closed")], {}),
    ("capped counts as accepted", [DispatchAnswer.capped("a", 0, 3_000.0)], {"a": None}),
    ("refused never opens", [DispatchAnswer.refused("a", 0, ReasonCode.OPTED_OUT, "x")], {}),
    ("a refused revision closes it", [ok("a"), DispatchAnswer.refused("a", 5, ReasonCode.INVALID, "x")], {}),
    ("a DUPLICATE refusal does not", [ok("a"), DispatchAnswer.refused("a", 5, ReasonCode.DUPLICATE, "x")],
     {"a": None}),
    ("energy of an unknown event is ignored", [energy("zz", 1, 5.0)], {}),
    ("other records change nothing", [ok("a"), Transition(1, Mode.STANDBY, Mode.DISCHARGE, "x"),
                                      FaultRaised(2, FaultKind.OVER_TEMP, "hot")], {"a": None}),
    ("two open", [ok("a"), ok("b"), E1], {"a": E1, "b": None}),
    ("an accepted STOP holds nothing: never open", [STOP, ok("stop-1")], {}),
    ("a STOP revision of an event closes it", [ok("a"), E1, DispatchEnded(5, "a", "revision 1 changed it to stop"),
                                              STOP_A, ok("a", 5)], {}),
]


@pytest.mark.parametrize("events, expected", [row[1:] for row in OPEN_ROWS], ids=[row[0] for row in OPEN_ROWS])
def test_open_events(events, expected):
    assert open_events(events) == expected


CLOSE_ROWS = [
    # (name, meter total now, billed meter Wh for "a")
    ("the gap is billed", 5_010.0, 110.0),
    ("no gap", 5_000.0, 100.0),
    ("exactly the most a crash can leave", 5_000.0 + MOST, 100.0 + MOST),
    ("more than a crash can leave: not billed", 5_000.0 + MOST + 1, 100.0),
    ("a meter that ran backwards: not billed", 4_990.0, 100.0),
    ("no meter reading now", None, 100.0),
]


@pytest.mark.parametrize("total, billed", [row[1:] for row in CLOSE_ROWS], ids=[row[0] for row in CLOSE_ROWS])
def test_close_after_restart_bills_the_meter_gap(total, billed):
    events = close_after_restart({"a": E1}, total, POLICY, 500.0, "gateway restarted: event ended")
    ended, final = events
    assert ended == DispatchEnded(500.0, "a", "gateway restarted: event ended")
    assert (final.at, final.request_id, final.final, final.meter_total_wh) == (500.0, "a", True, total)
    assert final.meter_wh == pytest.approx(billed, abs=1e-3)
    assert final.integrated_wh == pytest.approx(billed, abs=1e-3)  # E1 integrated what it metered; the gap alike


def test_the_gap_billed_after_a_crash_counts_in_the_integral_as_metered():
    """A crash 25 s into a 10 kW event whose only report was its opening one: the restart bills the
    meter's 70 Wh, and the integral says the same, not the 0 Wh that made statements claim the meter
    and power differ by 100 %."""
    (_, final) = close_after_restart({"a": energy("a", 0.0, 0.0, 5_000.0)}, 5_070.0, POLICY, 90.0, "r")
    assert (final.meter_wh, final.integrated_wh) == (70.0, 70.0)
    (_, kept) = close_after_restart({"a": energy("a", 60.0, 100.0, 5_000.0, integrated=97.0)}, 5_010.0,
                                    POLICY, 90.0, "r")
    assert (kept.meter_wh, kept.integrated_wh) == (110.0, 107.0)  # the run's own cross-check kept


def test_only_the_most_recently_reported_event_gets_the_gap():
    still_open = {"old": energy("old", 10.0, 40.0, 4_000.0), "new": E1, "silent": None}
    events = close_after_restart(still_open, 5_020.0, POLICY, 500.0, "gateway stopped: event ended")
    finals = {e.request_id: e.meter_wh for e in events if isinstance(e, EventEnergy)}
    assert finals == {"old": 40.0, "new": 120.0, "silent": 0.0}
    assert [e.request_id for e in events if isinstance(e, DispatchEnded)] == ["old", "new", "silent"]
    assert all(e.final and e.meter_total_wh == 5_020.0 for e in events if isinstance(e, EventEnergy))


def test_an_event_with_no_energy_record_closes_at_zero():
    (ended, final) = close_after_restart({"a": None}, 9_999.0, POLICY, 1.0, "r")
    assert ended == DispatchEnded(1.0, "a", "r")
    assert (final.meter_wh, final.integrated_wh, final.final) == (0.0, 0.0, True)


def test_a_report_without_a_meter_reading_bills_no_gap():
    (_, final) = close_after_restart({"a": energy("a", 60.0, 100.0, None)}, 5_010.0, POLICY, 1.0, "r")
    assert final.meter_wh == 100.0


def test_nothing_open_closes_nothing():
    assert close_after_restart({}, 5_000.0, POLICY, 1.0, "r") == []


reports = st.builds(energy, st.sampled_from(["a", "b", "c"]), st.floats(0, 1e4), st.floats(0, 1e4),
                    st.none() | st.floats(0, 1e6))


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.none() | reports, max_size=3),
       st.none() | st.floats(0, 1e6))
def test_a_restart_never_bills_more_than_a_crash_can_leave(still_open, total):
    events = close_after_restart(still_open, total, POLICY, 1e5, "r")
    finals = {e.request_id: e for e in events if isinstance(e, EventEnergy)}
    assert set(finals) == set(still_open) and all(e.final for e in finals.values())
    extra = [finals[rid].meter_wh - (last.meter_wh if last else 0.0) for rid, last in still_open.items()]
    assert all(x >= -1e-3 for x in extra)
    assert sum(extra) <= MOST + 1e-3
    assert sum(1 for x in extra if x > 1e-3) <= 1


def test_no_meter_interval_with_the_grid_down_is_billed_to_the_event():
    """The house's backup is never the aggregator's: neither the interval in which the outage began (its end
    reading reports it) nor the ones after, though the event stays booked through the outage."""
    c = step(ready(0.0), [discharge("peak", 0.0, 0.0, 3_600, 5_000)], 0.0).controller
    meter = 0.0
    for t in range(1, 31):
        meter += c.setpoint_w / 3600
        c = step(c, [bms(float(t)), inverter(float(t), measured_w=c.setpoint_w, tot_wh_inj=meter)], float(t)).controller
    billed = c.book.find("peak").meter_wh
    assert billed > 30
    for t in range(31, 41):  # islanded: the house draws 8 kW from the pack, the meter counts it
        meter += 8_000 / 3600
        c = step(c, [bms(float(t)), inverter(float(t), measured_w=8_000, tot_wh_inj=meter, grid_outage=True,
                                               grid_connected=False)], float(t)).controller
        assert c.mode is Mode.BACKUP
    entry = c.book.find("peak")
    assert entry.meter_wh == billed and entry.integrated_wh <= billed + 1e-9


def test_a_restart_after_the_grid_went_down_bills_the_event_none_of_the_houses_backup():
    """The pack serves the house in BACKUP and the meter counts it; a gateway that dies then (a likely
    moment to lose power) must not bill that gap to the event served before. Once the grid is back and
    the event served again, its next record comes at once: a crash after it bills the gap from there."""
    request = discharge("peak", 0.0, 0.0, 3_600, 5_000)
    first = step(ready(0.0), [request], 0.0)
    c, records, meter = first.controller, [request, *first.events], 0.0

    def at(t: float, **changes) -> None:
        nonlocal c
        result = step(c, [bms(t), inverter(t, tot_wh_inj=meter, **changes)], t)
        c = result.controller
        records.extend(result.events)

    for t in range(1, 66):
        meter += c.setpoint_w / 3600
        at(float(t), measured_w=c.setpoint_w)
    served = c.book.find("peak").meter_wh
    for t in range(66, 106):  # islanded: the house draws 5 kW through the inverter
        meter += 5_000 / 3600
        at(float(t), measured_w=5_000, grid_outage=True, grid_connected=False)
        assert c.mode is Mode.BACKUP
    closing = close_after_restart(open_events(records), meter, POLICY, 110.0, "gateway restarted: event ended")
    (final,) = [e for e in closing if isinstance(e, EventEnergy)]
    assert final.meter_wh == pytest.approx(served, abs=1e-3)  # not the 55 Wh of the house's backup on top

    for t in range(106, 120):  # the grid back (its enter-service delay), then the event served again
        meter += max(0.0, c.setpoint_w) / 3600
        at(float(t), measured_w=c.setpoint_w)
    assert c.serving_id == "peak"
    resumed = [e for e in records if isinstance(e, EventEnergy) and e.at > 105]
    assert resumed and resumed[0].meter_total_wh is not None  # reported at once on serving again
    meter += 20.0  # a crash now: what the meter counted since that record is the event's
    closing = close_after_restart(open_events(records), meter, POLICY, 121.0, "gateway restarted: event ended")
    last = open_events(records)["peak"]
    (final,) = [e for e in closing if isinstance(e, EventEnergy)]
    assert final.meter_wh == pytest.approx(last.meter_wh + meter - last.meter_total_wh, abs=1e-3)
    assert final.meter_wh >= last.meter_wh + 20


def test_an_event_handed_over_to_a_newer_request_gets_its_energy_record_at_once():
    """A newer request in force takes the inverter from the event served: the step that hands it over
    journals the first event's energy so far with the meter reading, before the newer one's first report,
    so its energy since its last periodic report is in the journal (only the served event is reported)."""
    c = step(ready(0.0), [discharge("A", 0.0, 0.0, 7_200, 10_000)], 0.0).controller
    meter = 0.0
    for t in range(1, 176):  # A's periodic reports at 0, 60 and 120 s
        meter += c.setpoint_w / 3600
        c = step(c, [bms(float(t)), inverter(float(t), measured_w=c.setpoint_w, tot_wh_inj=meter)], float(t)).controller
    assert c.serving_id == "A"
    result = step(c, [replace(discharge("B", 175.0, 175.0, 7_200, 10_000), source="site")], 175.0)
    assert result.controller.serving_id == "B"
    records = [e for e in result.events if isinstance(e, EventEnergy)]
    assert [(e.request_id, e.at) for e in records] == [("A", 175.0), ("B", 175.0)]
    assert records[0].meter_wh == pytest.approx(c.book.find("A").meter_wh, abs=1e-3)
    assert records[0].meter_total_wh == pytest.approx(meter) and not records[0].final


def test_a_crash_after_a_handover_bills_every_event_what_it_delivered():
    """After a handover the restart bills the meter's gap to the event served last from its last report;
    the event handed over closes at its record from the handover, which holds its energy up to then, so
    none of the meter's count is billed to no one, and none of one event's to the other."""
    run = Run(ready(0.0))
    run.feed(discharge("A", 0.0, 0.0, 7_200.0, target=10_000, source="aggregator"))
    run.run(175.0)  # A served; its reports come a minute apart, the last at 120 s
    run.feed(replace(discharge("B", run.t, run.t, 7_200.0, target=10_000), source="site"))  # newer: in force
    run.run(20.0)  # B served, then the gateway dies
    assert run.c.serving_id == "B"
    finals = close_after_restart(open_events(run.records), run.meter_wh, POLICY, run.t + 30, "gateway restarted")
    billed = {e.request_id: e.meter_wh for e in finals if isinstance(e, EventEnergy)}
    assert sum(billed.values()) == pytest.approx(run.meter_wh, abs=1e-2)
    assert billed["A"] == pytest.approx(run.c.book.find("A").meter_wh, abs=1e-2)
    assert billed["B"] == pytest.approx(run.c.book.find("B").meter_wh, abs=1e-2)


def test_a_crash_after_one_event_paused_and_a_newer_one_ran_bills_every_event_what_it_delivered():
    """The owner raises the reserve above the SoC: A stops with no successor, its window still open; B,
    a newer charge, is served then. The step that stopped A journals A's energy so far with the meter
    reading, so a crash while B runs (the restart billing the meter's gap to B, served last) leaves none
    of A's last minute billed to no one."""
    run = Run(ready(0.0))
    run.feed(discharge("A", 0.0, 0.0, 7_200.0, target=10_000, source="aggregator"))
    run.run(175.0)  # A served; its reports come a minute apart, the last at 120 s
    run.feed(OwnerSettings(85, run.t))  # the floor now above the SoC: A paused, not ended
    run.run(3.0)
    assert run.c.serving_id is None and not run.c.book.find("A").ended
    run.feed(replace(discharge("B", run.t, run.t, 7_200.0, target=5_000), source="site", kind=DispatchKind.CHARGE))
    run.run(30.0)  # B served, then the gateway dies
    assert run.c.serving_id == "B"
    finals = close_after_restart(open_events(run.records), run.meter_wh, POLICY, run.t + 30, "gateway restarted")
    billed = {e.request_id: e.meter_wh for e in finals if isinstance(e, EventEnergy)}
    assert billed["A"] == pytest.approx(run.c.book.find("A").meter_wh, abs=1e-2)
    assert billed["A"] == pytest.approx(run.meter_wh, abs=1e-2)  # all the meter counted was A's
