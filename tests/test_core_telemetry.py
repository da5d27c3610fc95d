"""The telemetry read model: built from the controller alone, typed, with link ages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core_builders import POLICY, bms, discharge, inverter, ready
from firmware_py.core import Controller, Mode, Telemetry, step, telemetry
from firmware_py.core.telemetry import DerRatings
from firmware_py.core.types import (
    BmsState,
    DispatchAnswer,
    FaultKind,
    JournalHealth,
    OwnerSettings,
    ReasonCode,
    Verdict,
)


def test_before_any_data():
    t = telemetry(Controller.start(POLICY), 5.0)
    assert t == Telemetry(at=5.0, mode=Mode.STARTUP, soc_pct=None, floor_pct=42.0, power_w=0.0, setpoint_w=0.0,
                          available_wh=0.0, active_event_id=None, reason="starting: waiting for BMS and inverter data",
                          faults=(), reserve_pct=40, verdict=None, cap_w=None, meter_wh=None, bms_age_s=None,
                          inverter_age_s=None, journal_ok=True, ratings=DerRatings.of(POLICY, None),
                          inverter_meters_wh=None, refusal=ReasonCode.NO_DATA,
                          refusal_detail="no fresh BMS or inverter data", site_limit_w=POLICY.max_discharge_w,
                          site_charge_limit_w=POLICY.max_charge_w)


def test_serving_an_event():
    c = ready(0.0, soc=80.0)
    c = step(c, [discharge("e1", 0.0, 0, 600, target=5_000)], 0.0).controller
    for now in (1.0, 2.0, 3.0):
        c = step(c, [bms(now), inverter(now, measured_w=2_000, tot_wh_inj=1_000 + now)], now).controller
    t = telemetry(c, 3.25)
    assert (t.mode, t.active_event_id, t.verdict, t.cap_w) == (Mode.DISCHARGE, "e1", Verdict.ACCEPTED, None)
    assert t.setpoint_w == c.setpoint_w > 0 and t.reason == c.reason
    assert t.power_w == 2_000 and t.meter_wh == round(c.book.find("e1").meter_wh, 3) > 0
    assert t.bms_age_s == pytest.approx(0.25) and t.inverter_age_s == pytest.approx(0.25)
    assert t.soc_pct == 80.0 and t.available_wh == c.available_wh(3.25)
    assert t.inverter_meters_wh == (1_003.0, c.inverter.tot_wh_abs)
    assert t.ratings == DerRatings.of(POLICY, c.inverter)


def test_the_ders_ratings_are_the_newest_good_readings_and_a_failed_poll_changes_none():
    """A 7.6 kW inverter that cannot charge: one failed poll had the DER advertise the gateway's own 11.5 kW both
    ways (model 702), take a charge setpoint it refuses while the link is up, and move the site limit a
    `WMaxLimPct` is in watts, until the next good poll."""
    c = ready(0.0)
    c = step(c, [bms(1.0), inverter(1.0, w_max_rtg=7_600.0, w_cha_max_rtg=0.0, w_discha_max_rtg=7_600.0)],
             1.0).controller
    reported = telemetry(c, 1.0).ratings
    assert (reported.w_max, reported.w_cha_max, reported.w_discha_max) == (7_600.0, 0.0, 7_600.0)
    c = step(c, [bms(2.0), inverter(2.0, comms_ok=False, error="timeout")], 2.0).controller
    assert not c.inverter.comms_ok and telemetry(c, 2.0).ratings == reported


def test_a_capped_event_shows_its_cap():
    c = ready(0.0, soc=45.0)
    c = step(c, [discharge("big", 0.0, 0, 4 * 3600)], 0.0).controller
    c = step(c, [bms(1.0, 45.0), inverter(1.0)], 1.0).controller
    t = telemetry(c, 1.0)
    assert t.verdict is Verdict.CAPPED and t.cap_w == c.book.find("big").answer.cap_w


@pytest.mark.parametrize("inputs, mode, faults", [
    ([bms(1.0, bms_state=BmsState.FAULT), inverter(1.0)], Mode.FAULT, (FaultKind.BMS_FAULT,)),
    ([bms(1.0, max_temp_c=80.0), inverter(1.0)], Mode.FAULT, (FaultKind.OVER_TEMP,)),
    ([bms(1.0), inverter(1.0, comms_ok=False, error="timeout")], Mode.FAULT, (FaultKind.INVERTER_COMMS,)),
    ([bms(1.0), inverter(1.0)], Mode.STANDBY, ()),
])
def test_faults_are_kinds(inputs, mode, faults):
    t = telemetry(step(ready(), inputs, 1.0).controller, 1.0)
    assert (t.mode, t.faults) == (mode, faults)


def test_lockout_shows_as_a_fault_kind():
    c = ready()
    for n in range(3):
        t0 = 10.0 * n
        c = step(c, [bms(t0 + 1, bms_state=BmsState.FAULT), inverter(t0 + 1)], t0 + 1).controller
        c = step(c, [bms(t0 + 2), inverter(t0 + 2)], t0 + 2).controller
        c = step(c, [bms(t0 + 8), inverter(t0 + 8)], t0 + 8).controller
    t = telemetry(c, 30.0)
    assert t.mode is Mode.LOCKOUT and FaultKind.LOCKOUT in t.faults


def test_owner_reserve_and_journal_health():
    c = step(ready(), [OwnerSettings(reserve_pct=55, received_at=1.0), JournalHealth(1.0, False, "disk full")],
             1.0).controller
    t = telemetry(c, 1.0)
    assert (t.reserve_pct, t.floor_pct, t.journal_ok) == (55, 57.0, False)


def test_stale_inverter_power_reads_zero():
    c = step(ready(), [bms(1.0), inverter(1.0, comms_ok=False, error="timeout", measured_w=3_000)], 1.0).controller
    assert telemetry(c, 1.0).power_w == 0.0


def test_the_inverters_lifetime_meters_hold_their_last_good_reading_through_a_failed_read():
    """A failed read carries no counters (0 Wh): shown, the metrics' counters fell to 0 at every Modbus
    timeout and came back, which Prometheus reads as a reset, and `increase()` as the whole meter again."""
    c = step(ready(), [bms(1.0), inverter(1.0, tot_wh_inj=10_000_000.0, tot_wh_abs=2_000.0)], 1.0).controller
    assert telemetry(c, 1.0).inverter_meters_wh == (10_000_000.0, 2_000.0)
    c = step(c, [bms(2.0), inverter(2.0, comms_ok=False, error="timeout", tot_wh_inj=0.0, tot_wh_abs=0.0)],
             2.0).controller
    assert telemetry(c, 2.0).inverter_meters_wh == (10_000_000.0, 2_000.0)


@given(st.floats(0, 100), st.floats(0, 10))
def test_telemetry_is_only_the_controller(soc, later):
    c = step(ready(soc=soc), [discharge("e", 0.0, 0, 600)], 0.0).controller
    t = telemetry(c, later)
    assert t.mode is c.mode and t.setpoint_w == c.setpoint_w and t.floor_pct == c.floor_pct(later)
    assert t.bms_age_s == later and t.inverter_age_s == later
    assert isinstance(t.mode, Mode)


def test_answer_field_is_the_books():
    c = step(ready(), [discharge("e", 0.0, 0, 600, target=3_000)], 0.0).controller
    c = step(c, [bms(1.0), inverter(1.0)], 1.0).controller
    assert c.book.find("e").answer == DispatchAnswer.accepted("e", 0.0)
    assert telemetry(c, 1.0).verdict is Verdict.ACCEPTED


def test_a_failed_poll_leaves_the_last_readings_power_for_people_and_0_w_for_readers_of_now():
    """An inverter that stopped answering at 6 kW: the owner's page showed "0 W (last reading)", which
    was never read (the inverter may run on at 6 kW until its revert). People see the last reading, with
    `inverter_fresh` saying so; `power_w`, which reports onward take as now's, stays 0 W."""
    from firmware_py.status import status_document

    c = ready(0.0)
    c = step(c, [bms(1.0), inverter(1.0, measured_w=6_000)], 1.0).controller
    assert telemetry(c, 1.0).last_power_w == telemetry(c, 1.0).power_w == 6_000
    c = step(c, [bms(2.0), inverter(2.0, comms_ok=False, error="timeout")], 2.0).controller
    t = telemetry(c, 2.0)
    assert (t.power_w, t.shown_power_w, t.inverter_fresh) == (0.0, 6_000, False)
    doc = status_document(t, {}, wall_now=1_750_000_000.0)
    assert (doc["power_w"], doc["fresh"]["inverter"]) == (6_000, False)
