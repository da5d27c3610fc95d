"""Per-state input/output tables: one row per step, as OpenEMS tests its state handlers.

Each table is a little story told in steps: at time t these inputs arrive; the
core must then be in this mode, command this setpoint, and say this reason.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from core_builders import POLICY, bms, discharge, inverter, ready
from firmware_py.core import Controller, Mode, step
from firmware_py.core.energy import delivered_wh
from firmware_py.core.types import (
    BmsState,
    ContactorState,
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    EventEnergy,
    FaultKind,
    FaultRaised,
    InstallerReset,
    InverterState,
    Tick,
    OwnerSettings,
    PackContactor,
    ReasonCode,
    Verdict,
)

ANY = object()


def run_table(rows, controller=None):
    c = controller or Controller.start(POLICY)
    results = []
    for t, inputs, mode, setpoint, reason in rows:
        result = step(c, inputs, t)
        c = result.controller
        assert c.mode is mode, f"t={t}: mode {c.mode} != {mode} ({result.command.reason})"
        if setpoint is not ANY:
            assert result.command.setpoint_w == pytest.approx(setpoint), f"t={t}: {result.command}"
        assert reason in result.command.reason, f"t={t}: {result.command.reason!r} lacks {reason!r}"
        results.append(result)
    return results


def both(t, soc=80.0, **bms_changes):
    return [bms(t, soc, **bms_changes), inverter(t)]


def test_startup_waits_for_both_sources_then_standby():
    run_table([
        (0.0, [], Mode.STARTUP, 0, "waiting"),
        (0.1, [bms(0.1)], Mode.STARTUP, 0, "waiting"),
        (0.2, [bms(0.2), inverter(0.2)], Mode.STANDBY, 0, "data ready"),
    ])


def test_discharge_ramps_holds_and_ends_with_the_window():
    req = discharge("e1", 1.0, start=2.0, end=12.0, target=5_000)
    results = run_table([
        (1.0, both(1.0) + [req], Mode.STANDBY, 0, "data ready"),
        (2.0, both(2.0), Mode.DISCHARGE, 0, "dispatch e1"),  # ramp starts from 0 this step
        (3.0, both(3.0), Mode.DISCHARGE, 2_000, "dispatch e1"),
        (4.0, both(4.0), Mode.DISCHARGE, 4_000, "dispatch e1"),
        (5.0, both(5.0), Mode.DISCHARGE, 5_000, "dispatch e1"),
        (12.0, both(12.0), Mode.STANDBY, 0, "no discharge request"),
    ], controller=Controller.start(POLICY, now=0))
    answer = results[0].answer_for("e1")
    assert answer.verdict is Verdict.ACCEPTED
    ended = [e for e in results[-1].events if isinstance(e, DispatchEnded)]
    assert [(e.request_id, e.reason) for e in ended] == [("e1", "window closed")]
    assert any(isinstance(e, EventEnergy) and e.final for e in results[-1].events)


def test_the_step_that_enters_a_ramp_asks_for_the_next_one_soon():
    """The core keeps no timers: the step entering DISCHARGE at 0 W says when its first watts are due."""
    from firmware_py.core.machine import RAMP_START_S

    req = discharge("e1", 1.0, start=1.0, end=12.0, target=5_000)
    standby, entering = run_table([
        (0.5, both(0.5), Mode.STANDBY, 0, "data ready"),
        (1.0, both(1.0) + [req], Mode.DISCHARGE, 0, "dispatch e1"),
    ], controller=Controller.start(POLICY, now=0))
    assert standby.step_again_at is None
    assert entering.step_again_at == pytest.approx(1.0 + RAMP_START_S)
    following = step(entering.controller, both(entering.step_again_at), entering.step_again_at)
    assert following.command.setpoint_w == pytest.approx(POLICY.ramp_w_per_s * RAMP_START_S)
    assert following.step_again_at is None  # the ramp goes on at the adapter's own cadence


def test_stale_bms_gives_zero_in_the_same_step_and_latches_a_fault():
    req = discharge("e1", 0.0, start=0.0, end=100.0, target=5_000)
    run_table([
        (0.0, both(0.0) + [req], Mode.DISCHARGE, 0, "dispatch"),
        (1.0, both(1.0), Mode.DISCHARGE, 2_000, "dispatch"),
        (1.4, [inverter(1.4)], Mode.DISCHARGE, 2_800, "dispatch"),  # BMS 0.4 s old: still fresh
        (1.6, [inverter(1.6)], Mode.FAULT, 0, "bms_stale"),  # 0.6 s > 0.5 s timeout
        (2.0, both(2.0), Mode.FAULT, 0, "bms_stale"),  # back, but the fault holds off
        (7.0, both(7.0), Mode.DISCHARGE, 0, "dispatch"),  # cleared after 5 s: resumes from 0
    ])


def test_one_stale_critical_field_is_enough():
    run_table([
        (0.0, both(0.0) + [discharge("e1", 0.0, 0.0, 100.0)], Mode.DISCHARGE, 0, "dispatch"),
        (1.0, both(1.0, stale=frozenset({"max_discharge_w"})), Mode.FAULT, 0, "bms_stale"),
    ])


def test_bms_fault_state_latches_and_stops_at_once():
    run_table([
        (0.0, both(0.0) + [discharge("e1", 0.0, 0.0, 100.0)], Mode.DISCHARGE, 0, "dispatch"),
        (1.0, both(1.0), Mode.DISCHARGE, 2_000, "dispatch"),
        (1.1, both(1.1, bms_state=BmsState.FAULT), Mode.FAULT, 0, "fault"),
        (2.0, both(2.0), Mode.FAULT, 0, "fault"),
        (5.9, both(5.9), Mode.FAULT, 0, "fault"),
        (7.1, both(7.1), Mode.DISCHARGE, 0, "dispatch"),
    ])


def test_open_contactors_inhibit_without_a_fault():
    results = run_table([
        (0.0, both(0.0) + [discharge("e1", 0.0, 0.0, 100.0)], Mode.DISCHARGE, 0, "dispatch"),
        (1.0, both(1.0), Mode.DISCHARGE, 2_000, "dispatch"),
        (1.1, both(1.1, contactor_state=ContactorState.OPEN), Mode.STANDBY, 0, "inhibit"),
        (2.0, both(2.0), Mode.DISCHARGE, 0, "dispatch"),
    ])
    assert not any(isinstance(e, FaultRaised) for r in results for e in r.events)


def test_bms_power_limit_clamps_immediately():
    run_table([
        (0.0, both(0.0) + [discharge("e1", 0.0, 0.0, 100.0)], Mode.DISCHARGE, 0, "dispatch"),
        (6.0, both(6.0), Mode.DISCHARGE, 11_500, "dispatch"),
        (6.1, both(6.1, max_discharge_w=3_000), Mode.DISCHARGE, 3_000, "clamped: bms limit"),
        (6.2, both(6.2, max_discharge_w=0), Mode.DISCHARGE, 0, "clamped: bms limit"),
    ])


def test_floor_ramps_power_down_and_stops_at_the_floor():
    # reserve 40 + margin 2 = 42 %: 0.05 % above the floor leaves ~58 Wh.
    c = step(Controller.start(POLICY), both(0.0, soc=50.0), 0.0).controller
    c = step(c, [discharge("e1", 0.0, 0.0, 600.0)], 0.0).controller
    c = step(c, both(10.0, soc=50.0), 10.0).controller
    assert c.setpoint_w == pytest.approx(11_500)
    r = step(c, both(11.0, soc=42.005), 11.0)
    assert r.command.reason == "clamped: reserve" and 0 < r.command.setpoint_w < 11_500
    r = step(r.controller, both(12.0, soc=42.0), 12.0)
    assert r.controller.mode is Mode.STANDBY and r.command.setpoint_w == 0
    assert "floor reached" in r.command.reason


def test_grid_outage_backs_up_on_the_backup_floor_and_returns():
    outage = lambda t, soc=30.0: [bms(t, soc), inverter(t, grid_outage=True, grid_connected=False)]
    run_table([
        (0.0, both(0.0, soc=30.0), Mode.STANDBY, 0, "data ready"),
        (1.0, outage(1.0), Mode.BACKUP, 11_500, "backup"),  # 30 % is below the reserve but above backup
        (2.0, outage(2.0, soc=22.0), Mode.BACKUP, 0, "clamped: reserve"),  # backup floor 20 + 2
        (3.0, both(3.0, soc=22.0), Mode.STANDBY, 0, "grid restored"),
    ])


def test_lockout_after_repeated_faults_until_installer_reset():
    c = step(Controller.start(POLICY), both(0.0), 0.0).controller
    t = 0.0
    for n in range(3):
        assert c.mode is not Mode.LOCKOUT, f"locked out after only {n} faults"
        c = step(c, both(t + 1, bms_state=BmsState.FAULT), t + 1).controller  # raised
        c = step(c, both(t + 2), t + 2).controller  # condition gone
        c = step(c, both(t + 8), t + 8).controller  # hold-off passed: cleared
        t += 10
    assert c.mode is Mode.LOCKOUT
    c = step(c, both(t + 1000), t + 1000).controller
    assert c.mode is Mode.LOCKOUT, "lockout must not clear by itself"
    r = step(c, both(t + 1001) + [InstallerReset(t + 1001)], t + 1001)
    assert r.controller.mode is Mode.STANDBY
    assert [e.to_state for e in r.events if hasattr(e, "to_state")] == ["STARTUP", "STANDBY"]


def test_fault_recovery_settles_several_transitions_in_one_step():
    c = step(Controller.start(POLICY), both(0.0) + [discharge("e1", 0.0, 0.0, 100.0)], 0.0).controller
    c = step(c, both(1.0, bms_state=BmsState.FAULT), 1.0).controller
    assert c.mode is Mode.FAULT
    c = step(c, both(2.0), 2.0).controller
    assert c.mode is Mode.FAULT
    r = step(c, both(7.0), 7.0)
    assert [e.to_state for e in r.events if hasattr(e, "to_state")] == ["STARTUP", "STANDBY", "DISCHARGE"]


def answers(results):
    return [e for r in results for e in r.events if isinstance(e, DispatchAnswer)]


@pytest.mark.parametrize("request_, code", [
    (discharge("", 0.0, 10, 20), ReasonCode.INVALID),
    (discharge("x", 0.0, 20, 10), ReasonCode.INVALID),
    (discharge("x", 0.0, 10, 20, target=-5), ReasonCode.INVALID),
    (discharge("x", 0.0, 10, 20, target=math.nan), ReasonCode.INVALID),
    (discharge("x", 0.0, 10, -math.inf), ReasonCode.INVALID),
    (discharge("x", 0.0, 10, math.nan), ReasonCode.INVALID),
    (discharge("x", 0.0, math.inf, math.inf), ReasonCode.INVALID),
    (discharge("x", 0.0, 10, 20, ramp_w_per_s=0), ReasonCode.INVALID),
    (discharge("x", 0.0, -20, -10), ReasonCode.EXPIRED),
])
def test_malformed_and_expired_requests_are_rejected_with_a_reason(request_, code):
    c = step(Controller.start(POLICY), both(0.0), 0.0).controller
    r = step(c, [request_], 0.0)
    (answer,) = answers([r])
    assert answer.verdict is Verdict.REJECTED and answer.reason is code and answer.detail


def test_duplicate_is_idempotent_and_conflicting_reuse_is_refused():
    c = step(Controller.start(POLICY), both(0.0), 0.0).controller
    req = discharge("e1", 0.0, 10, 20, target=5_000)
    first = step(c, [req], 0.0)
    again = step(first.controller, both(1.0) + [replace(req, received_at=1.0)], 1.0)
    other = step(again.controller, both(2.0) + [replace(req, target_w=6_000)], 2.0)
    newer = step(other.controller, both(3.0) + [replace(req, target_w=6_000, revision=1)], 3.0)
    a1, a2, a3, a4 = (answers([r])[0] for r in (first, again, other, newer))
    assert a1.verdict is a2.verdict is Verdict.ACCEPTED
    assert a3.verdict is Verdict.REJECTED and a3.reason is ReasonCode.DUPLICATE
    assert a4.verdict is Verdict.ACCEPTED
    assert newer.controller.book.find("e1").request.target_w == 6_000


def test_budget_caps_or_refuses():
    # 45 %: 3 % above the 42 % floor = 3.5 kWh AC. Four hours at 11.5 kW cannot be served.
    c = step(Controller.start(POLICY), both(0.0, soc=45.0), 0.0).controller
    capped = answers([step(c, [discharge("a", 0.0, 0, 4 * 3600)], 0.0)])[0]
    above_floor_wh = (45.0 - 42.0) / 100 * POLICY.usable_capacity_wh * POLICY.dc_efficiency  # AC, after losses
    stopping_wh = 11_500 ** 2 / (2 * POLICY.ramp_w_per_s) / 3600  # ramping down from the asked power
    assert capped.verdict is Verdict.CAPPED
    assert capped.cap_w == pytest.approx((above_floor_wh - stopping_wh) / 4, abs=0.05)
    c42 = step(Controller.start(POLICY), both(0.0, soc=42.01), 0.0).controller
    refused = answers([step(c42, [discharge("b", 0.0, 0, 4 * 3600)], 0.0)])[0]
    assert refused.reason is ReasonCode.INSUFFICIENT_ENERGY


def test_a_charge_request_for_a_full_pack_is_refused_for_want_of_room():
    c = step(Controller.start(POLICY), both(0.0, soc=99.0, soc_max_pct=100.0), 0.0).controller
    charge = replace(discharge("c", 0.0, 0, 3600, 3_000), kind=DispatchKind.CHARGE)
    (refused,) = answers([step(c, [charge], 0.0)])
    assert refused.verdict is Verdict.REJECTED and refused.reason is ReasonCode.INSUFFICIENT_ENERGY


@pytest.mark.parametrize("welded", [{"contactor_state": ContactorState.WELDED},
                                    {"pack_contactor_neg": PackContactor.WELDED},
                                    {"pack_contactor_pos": PackContactor.WELDED}], ids=["contactor", "neg", "pos"])
def test_each_welded_contactor_raises_its_fault_and_counts_toward_the_lockout(welded):
    c = step(Controller.start(POLICY), both(0.0), 0.0).controller
    t = 0.0
    for _ in range(POLICY.lockout_faults):
        r = step(c, both(t + 1, **welded), t + 1)
        assert [e.kind for e in r.events if isinstance(e, FaultRaised)][:1] == [FaultKind.CONTACTOR_WELDED]
        assert r.command.setpoint_w == 0
        c = step(step(r.controller, both(t + 2), t + 2).controller, both(t + 8), t + 8).controller  # gone, cleared
        t += 10
    assert c.mode is Mode.LOCKOUT


def test_owner_opt_out_refuses_and_ends_running_events():
    c = step(Controller.start(POLICY), both(0.0) + [discharge("e1", 0.0, 0, 100)], 0.0).controller
    c = step(c, both(5.0), 5.0).controller
    assert c.setpoint_w > 0
    out = OwnerSettings(reserve_pct=40, received_at=6.0, opt_out_until=math.inf)
    r = step(c, both(6.0) + [out], 6.0)
    assert r.command.setpoint_w == 0 and r.controller.mode is Mode.STANDBY
    assert [e.reason for e in r.events if isinstance(e, DispatchEnded)] == ["owner opted out"]
    refused = answers([step(r.controller, both(7.0) + [discharge("e2", 7.0, 7, 100)], 7.0)])[0]
    assert refused.reason is ReasonCode.OPTED_OUT


def test_opt_out_for_one_event_only():
    owner = OwnerSettings(reserve_pct=40, received_at=0.0, opt_out_events=frozenset({"skip"}))
    c = step(Controller.start(POLICY), both(0.0) + [owner], 0.0).controller
    a = answers([step(c, [discharge("skip", 0.0, 0, 100), discharge("keep", 0.0, 0, 100)], 0.0)])
    assert [(x.request_id, x.verdict) for x in a] == [("skip", Verdict.REJECTED), ("keep", Verdict.ACCEPTED)]


def test_departure_raises_the_floor_ahead_of_time():
    # Departure in 1 h needing 90 %: recharging 7.6 kW for 1 h adds ~6.2 %, so ~83.8 % is needed now.
    owner = OwnerSettings(reserve_pct=40, received_at=0.0, departure_at=3600.0, departure_soc_pct=90.0)
    c = step(Controller.start(POLICY), both(0.0, soc=80.0) + [owner], 0.0).controller
    assert c.floor_pct(0.0) == pytest.approx(90 - 7600 / 123000 * 100 + 2)
    a = answers([step(c, [discharge("e1", 0.0, 0, 600)], 0.0)])[0]
    assert a.reason is ReasonCode.INSUFFICIENT_ENERGY


def test_cancel_and_stop_end_events_and_report_final_energy():
    c = Controller.start(POLICY)
    for t in (0.0, 1.0, 2.0, 3.0):
        inputs = [bms(t), inverter(t, measured_w=4_000, tot_wh_inj=1000 + t)]
        c = step(c, inputs + ([discharge("e1", 0.0, 0, 100)] if t == 0 else []), t).controller
    r = step(c, [DispatchCancel("e1", "test", 4.0), bms(4.0), inverter(4.0, tot_wh_inj=1004)], 4.0)
    final = [e for e in r.events if isinstance(e, EventEnergy) and e.final]
    # The step's reading counts before its cancel (listed first or not): the energy up to 4 s is the event's.
    assert final and final[0].meter_wh == pytest.approx(4.0)
    assert final[0].integrated_wh == pytest.approx(4_000 * 3 / 3600 + 2_000 / 3600, abs=1e-3)
    stop = DispatchRequest("s", "test", DispatchKind.STOP, 0, 5.0, 6.0, received_at=5.0)
    c2 = step(r.controller, both(5.0) + [discharge("e2", 5.0, 5, 100)], 5.0).controller
    r2 = step(c2, [stop], 5.0)
    assert [e.request_id for e in r2.events if isinstance(e, DispatchEnded)] == ["e2"]


def test_inverter_fault_and_comms_loss_stop_everything():
    c = step(Controller.start(POLICY), both(0.0) + [discharge("e1", 0.0, 0, 100)], 0.0).controller
    c = step(c, both(3.0), 3.0).controller
    r = step(c, [bms(3.1), inverter(3.1, inv_state=InverterState.FAULT)], 3.1)
    assert r.controller.mode is Mode.FAULT and r.command.setpoint_w == 0
    c = step(Controller.start(POLICY), both(0.0) + [discharge("e1", 0.0, 0, 100)], 0.0).controller
    r = step(c, [bms(0.5), inverter(0.5, comms_ok=False, error="timeout")], 0.5)
    assert r.controller.mode is Mode.FAULT and "inverter_comms" in r.command.reason


def test_the_reason_in_fault_names_the_faults_latched_now_not_the_first():
    """The inverter link lost while the BMS was silent: the BMS back and its fault cleared, the mode is still
    FAULT (the inverter's), and the reason `status` shows named the cleared `bms_stale` alone."""
    c = ready(0.0)
    c = step(c, [inverter(0.6)], 0.6).controller  # the BMS 0.6 s old: bms_stale
    c = step(c, [inverter(1.0, comms_ok=False, error="timeout")], 1.0).controller
    assert c.reason == "fault: bms_stale, inverter_comms"
    for t in (2.0, 4.0, 6.0, 7.5):  # the BMS back from 2 s; its fault clears after the 5 s hold-off
        bms_back = step(c, [bms(t), inverter(t, comms_ok=False, error="timeout")], t)
        c = bms_back.controller
    assert c.mode is Mode.FAULT and c.faults.kinds == (FaultKind.INVERTER_COMMS,)
    assert bms_back.command.reason == "fault: inverter_comms"


def test_a_modification_continues_the_event_and_its_energy():
    c = Controller.start(POLICY)
    for t in (0.0, 1.0, 2.0):
        inputs = [bms(t), inverter(t, measured_w=3_600, tot_wh_inj=100 + t)]
        c = step(c, inputs + ([discharge("e1", 0.0, 0, 100, target=4_000)] if t == 0 else []), t).controller
    r = step(c, [bms(2.5), discharge("e1", 2.5, 0, 100, target=6_000, revision=1)], 2.5)
    assert not [e for e in r.events if isinstance(e, DispatchEnded)]
    entry = r.controller.book.find("e1")
    assert entry.request.target_w == 6_000 and entry.meter_wh == pytest.approx(2.0)
    refused = step(r.controller, [bms(3.0), discharge("e1", 3.0, 0, 100, target=-1, revision=2)], 3.0)
    (ended,) = [e for e in refused.events if isinstance(e, DispatchEnded)]
    assert ended.reason == "revision 2 refused"
    final = [e for e in refused.events if isinstance(e, EventEnergy) and e.final]
    assert final[0].meter_wh == pytest.approx(2.0)


def test_a_hair_above_the_floor_with_an_ageing_snapshot_gives_zero_not_an_error():
    """Energy used since the snapshot can exceed what was above the floor: the envelope is 0, not √(-x)."""
    owner = OwnerSettings(reserve_pct=40.05, received_at=0.0)  # a floor off the 0.1 % SoC grid
    c = step(Controller.start(POLICY), both(0.0, soc=60.0) + [owner, discharge("e1", 0.0, 0, 600)], 0.0).controller
    c = step(c, both(6.0, soc=60.0), 6.0).controller
    assert c.setpoint_w == pytest.approx(11_500)
    c = step(c, both(6.1, soc=42.0501), 6.1).controller
    r = step(c, [inverter(6.4), Tick(6.4)], 6.4)  # the BMS snapshot is 0.3 s old, 11.5 kW meanwhile
    assert r.command.setpoint_w == 0 and r.command.reason == "clamped: reserve"


def test_a_refused_revision_ends_the_event_but_keeps_its_energy():
    c = Controller.start(POLICY)
    for t in (0.0, 1.0, 2.0):
        inputs = [bms(t), inverter(t, measured_w=3_600, tot_wh_inj=100 + t)]
        c = step(c, inputs + ([discharge("e1", 0.0, 0, 100, target=4_000)] if t == 0 else []), t).controller
    owner = OwnerSettings(reserve_pct=40, received_at=2.5, opt_out_events=frozenset())
    r = step(c, [bms(2.5), owner, discharge("e1", 2.5, 2.5, 2.0, target=4_000, revision=1)], 2.5)  # invalid
    entry = r.controller.book.find("e1")
    assert entry.ended and entry.meter_wh == pytest.approx(2.0)
    assert (entry.request.revision, entry.answer.reason) == (1, ReasonCode.INVALID)  # a repeat gets this answer
    assert delivered_wh(r.controller) == {"e1": pytest.approx(2.0)}


def test_a_cancel_from_another_source_is_ignored():
    c = step(Controller.start(POLICY), both(0.0) + [discharge("e1", 0.0, 0, 100)], 0.0).controller
    r = step(c, both(1.0) + [DispatchCancel("e1", "someone-else", 1.0)], 1.0)
    assert not [e for e in r.events if isinstance(e, DispatchEnded)]
    assert r.controller.mode is Mode.DISCHARGE


def test_a_short_opt_out_does_not_end_a_later_event():
    c = step(Controller.start(POLICY), both(0.0) + [discharge("later", 0.0, 7200, 9000)], 0.0).controller
    r = step(c, both(1.0) + [OwnerSettings(reserve_pct=40, received_at=1.0, opt_out_until=3600.0)], 1.0)
    assert not [e for e in r.events if isinstance(e, DispatchEnded)]
    assert r.controller.book.find("later") in r.controller.book.live


def test_link_faults_hold_zero_but_never_lock_the_truck_out():
    """A link that drops and heals (a flaky Modbus cable, an adapter re-plugged) is not the pack's fault:
    however often, the gateway serves again once the data is fresh; only faults in the data count."""
    c = step(Controller.start(POLICY), both(0.0), 0.0).controller
    t = 0.0
    for _ in range(POLICY.lockout_faults + 2):
        c = step(c, [bms(t + 1)], t + 5).controller  # the inverter went quiet: inverter_comms
        assert c.mode is Mode.FAULT
        c = step(c, both(t + 6), t + 6).controller
        c = step(c, both(t + 12), t + 12).controller  # hold-off passed: cleared
        assert c.mode is Mode.STANDBY
        t += 20
    assert not c.faults.locked_out


# ---------------------------------------------------------------- storm watch


def storm(t: float, floor: float, until: float, reserve: float = 40) -> OwnerSettings:
    return OwnerSettings(reserve_pct=reserve, received_at=t, storm_watch_floor_pct=floor, storm_watch_until=until)


def test_storm_watch_refuses_dispatch_below_it_with_its_own_reason_and_caps_above_it():
    c = step(Controller.start(POLICY), both(0.0, soc=70.0) + [storm(0.0, 75.0, 7200.0)], 0.0).controller
    assert c.floor_pct(0.0) == pytest.approx(77.0)  # 75 % + the 2 % margin, above the 42 % reserve floor
    refused = answers([step(c, [discharge("e1", 0.0, 0, 3600)], 0.0)])[0]
    assert refused.reason is ReasonCode.STORM_WATCH and "storm watch keeps 75 %" in refused.detail
    above = step(Controller.start(POLICY), both(0.0, soc=80.0) + [storm(0.0, 75.0, 7200.0)], 0.0).controller
    capped = answers([step(above, [discharge("e2", 0.0, 0, 4 * 3600)], 0.0)])[0]
    assert capped.verdict is Verdict.CAPPED and "storm watch" in capped.detail
    # An event that starts after the storm watch ends is judged on the reserve alone.
    later = answers([step(c, [discharge("e3", 0.0, 7200, 7800, target=5_000)], 0.0)])[0]
    assert later.verdict is Verdict.ACCEPTED


def test_storm_watch_set_mid_event_stops_discharge_at_its_floor_and_revoking_it_resumes():
    req = discharge("e1", 0.0, 0.0, 3600.0, target=5_000)
    no_charger = dict(w_cha_max_rtg=0)  # an inverter that cannot charge: the storm watch only holds
    rows = [
        (0.0, [bms(0.0, 70.0), inverter(0.0, **no_charger), req], Mode.DISCHARGE, 0, "dispatch e1"),
        (1.0, [bms(1.0, 70.0), inverter(1.0, **no_charger)], Mode.DISCHARGE, 2_000, "dispatch e1"),
        (2.0, [bms(2.0, 70.0), inverter(2.0, **no_charger), storm(2.0, 80.0, 600.0)], Mode.STANDBY, 0,
         "by the storm watch"),
        (3.0, [bms(3.0, 70.0), inverter(3.0, **no_charger)], Mode.STANDBY, 0, "by the storm watch"),
        (4.0, [bms(4.0, 70.0), inverter(4.0, **no_charger), OwnerSettings(40, 4.0)], Mode.DISCHARGE, 0, "dispatch e1"),
        (5.0, [bms(5.0, 70.0), inverter(5.0, **no_charger)], Mode.DISCHARGE, 2_000, "dispatch e1"),
    ]
    results = run_table(rows)
    assert not [e for r in results for e in r.events if isinstance(e, DispatchEnded)]  # held, not ended


def test_storm_watch_charges_toward_its_floor_within_every_charge_limit_then_holds():
    results = run_table([
        (0.0, both(0.0, soc=60.0), Mode.STANDBY, 0, "data ready"),
        (1.0, both(1.0, soc=60.0) + [storm(1.0, 70.0, 7200.0)], Mode.CHARGE, 0, "storm watch: charging toward 70 %"),
        (2.0, both(2.0, soc=60.0), Mode.CHARGE, -2_000, "storm watch"),  # ramped at ramp_w_per_s
        (9.0, both(9.0, soc=60.0), Mode.CHARGE, -11_500, "storm watch"),  # at the site limit
        (10.0, [bms(10.0, 60.0, max_charge_w=3_000), inverter(10.0)], Mode.CHARGE, -3_000, "clamped: bms limit"),
        (11.0, both(11.0, soc=69.9), Mode.CHARGE, ANY, "storm watch"),
        (12.0, both(12.0, soc=70.0), Mode.STANDBY, 0, "storm watch met"),
        (13.0, both(13.0, soc=69.7), Mode.STANDBY, 0, "storm watch met"),  # within the entry hysteresis
        (14.0, both(14.0, soc=69.4), Mode.CHARGE, 0, "storm watch: charging"),
    ])
    assert all(r.controller.serving_id is None for r in results)  # no event is billed for the owner's charge


def test_storm_watch_never_charges_where_the_inverter_cannot_and_yields_to_an_outage():
    run_table([
        (0.0, [bms(0.0, 60.0), inverter(0.0, w_cha_max_rtg=0), storm(0.0, 70.0, 7200.0)], Mode.STANDBY, 0,
         "data ready"),
        (1.0, [bms(1.0, 60.0), inverter(1.0, w_cha_max_rtg=0)], Mode.STANDBY, 0, "data ready"),
    ])
    c = step(Controller.start(POLICY), both(0.0, soc=60.0) + [storm(0.0, 70.0, 7200.0)], 0.0).controller
    assert c.mode is Mode.CHARGE
    out = step(c, [bms(1.0, 60.0), inverter(1.0, grid_outage=True, grid_connected=False)], 1.0)
    assert out.controller.mode is Mode.BACKUP and out.command.setpoint_w > 0  # the house uses what was kept
    assert out.controller.floor_pct(1.0) == pytest.approx(POLICY.backup_floor_pct + POLICY.soc_margin_pct)


def test_storm_watch_ends_at_its_time_and_the_floor_falls_back():
    c = step(Controller.start(POLICY), [bms(0.0, 70.0), inverter(0.0, w_cha_max_rtg=0), storm(0.0, 80.0, 100.0)],
             0.0).controller
    assert c.floor_pct(99.0) == pytest.approx(82.0) and c.floor_pct(100.0) == pytest.approx(42.0)
    r = step(c, [bms(100.0, 70.0), inverter(100.0, w_cha_max_rtg=0), discharge("e1", 100.0, 100, 200, 5_000)], 100.0)
    assert answers([r])[0].verdict is Verdict.ACCEPTED and r.controller.mode is Mode.DISCHARGE


def test_bms_data_stamped_after_now_is_not_believed_and_hides_nothing():
    """A snapshot from the future would look fresh for as long as its stamp is ahead and hide every
    real one behind it; it is dropped, so real data (here a FAULT) still rules and silence still stales."""
    req = discharge("e1", 0.0, start=0.0, end=100.0, target=5_000)
    *_, last = run_table([
        (0.0, both(0.0) + [req], Mode.DISCHARGE, 0, "dispatch"),
        (1.0, both(1.0) + [bms(1e9)], Mode.DISCHARGE, 2_000, "dispatch"),
        (1.6, [inverter(1.6)], Mode.FAULT, 0, "bms_stale"),  # the real snapshot of 1.0 s is 0.6 s old
        (2.0, both(2.0, bms_state=BmsState.FAULT), Mode.FAULT, 0, "fault"),
    ])
    assert [e.kind for e in last.events if isinstance(e, FaultRaised)] == [FaultKind.BMS_FAULT]


def test_a_late_inverter_reading_sets_neither_freshness_nor_the_meter_back():
    c = step(step(Controller.start(POLICY, now=0.0), both(0.0), 0.0).controller,
             [discharge("e1", 0.0, 0.0, 100.0, 10_000)], 0.0).controller
    for t in range(1, 11):
        readings = [inverter(float(t), measured_w=10_000, tot_wh_inj=10_000 * t / 3600)]
        if t == 6:  # a reading taken at 5.5 s arrives after the one of 6 s
            readings.append(inverter(5.5, measured_w=10_000, tot_wh_inj=10_000 * 5.5 / 3600))
        c = step(c, [bms(float(t)), *readings], float(t)).controller
        assert c.inverter.received_at == float(t)
    assert c.book.find("e1").meter_wh == pytest.approx(10_000 * 10 / 3600)  # what the meter counted


@pytest.mark.parametrize("resolution_wh", [1.0, 10.0, 100.0])
def test_a_coarse_meter_is_billed_as_it_counts(resolution_wh):
    """A meter register of 10 or 100 Wh a count (SunSpec TotWh_SF 1 or 2) holds still, then steps by a
    count: each step stands for the time since it last moved, so the bill is what the meter counted
    (before, a step above the rating's worth of one poll was refused, and 10 Wh counts billed a twelfth)."""
    c = step(step(Controller.start(POLICY, now=0.0), both(0.0), 0.0).controller,
             [discharge("e1", 0.0, 0.0, 3_600.0, 3_000)], 0.0).controller
    flowed = 0.0
    for t in range(1, 601):
        flowed += c.setpoint_w / 3600
        meter = 5_000 + math.floor(flowed / resolution_wh) * resolution_wh
        c = step(c, [bms(float(t)), inverter(float(t), measured_w=c.setpoint_w, tot_wh_inj=meter)], float(t)).controller
    counted = math.floor(flowed / resolution_wh) * resolution_wh
    assert c.book.find("e1").meter_wh == pytest.approx(counted)
    assert flowed - resolution_wh <= counted <= flowed


def test_a_meter_that_jumps_after_one_poll_is_still_not_billed():
    c = step(step(Controller.start(POLICY, now=0.0), both(0.0), 0.0).controller,
             [discharge("e1", 0.0, 0.0, 3_600.0, 3_000)], 0.0).controller
    meter = 5_000.0
    for t in range(1, 11):
        meter += c.setpoint_w / 3600 + (500.0 if t == 5 else 0.0)  # a glitch of 500 Wh in one second
        c = step(c, [bms(float(t)), inverter(float(t), measured_w=c.setpoint_w, tot_wh_inj=meter)], float(t)).controller
    entry = c.book.find("e1")
    assert entry.meter_wh < 100 and entry.meter_wh == pytest.approx(entry.integrated_wh, abs=5)


def test_a_meter_that_jumps_in_an_events_first_reading_after_a_quiet_quarter_hour_is_not_billed():
    """Held still for 15 minutes, a coarse meter's step may stand for all of them: but only for what the
    commands let flow meanwhile (plus a count), not for 5 kWh the gateway never asked for."""
    meter = 5_000.0
    c = step(Controller.start(POLICY, now=0.0), [bms(0.0), inverter(0.0, tot_wh_inj=meter)], 0.0).controller
    for t in range(1, 901):  # idle: the meter holds still
        c = step(c, [bms(float(t)), inverter(float(t), tot_wh_inj=meter)], float(t)).controller
    c = step(c, [discharge("e1", 900.0, 900.0, 4_500.0, 3_000)], 900.0).controller
    for t in range(901, 911):
        meter += c.setpoint_w / 3600 + (5_000.0 if t == 901 else 0.0)
        c = step(c, [bms(float(t)), inverter(float(t), measured_w=c.setpoint_w, tot_wh_inj=meter)], float(t)).controller
    entry = c.book.find("e1")
    assert entry.meter_wh < 50 and entry.meter_wh == pytest.approx(entry.integrated_wh, abs=5)


@pytest.mark.parametrize("field, fault", [("max_temp_c", FaultKind.OVER_TEMP), ("min_temp_c", FaultKind.UNDER_TEMP)])
def test_a_temperature_that_is_no_number_is_a_fault_not_a_cool_pack(field, fault):
    """CAN decoding cannot give NaN, but the core's claims must not rest on that: a comparison with NaN is
    always false, so it is written to fault on a temperature it cannot read."""
    *_, last = run_table([
        (0.0, both(0.0) + [discharge("e1", 0.0, 0.0, 100.0, 5_000)], Mode.DISCHARGE, 0, "dispatch"),
        (1.0, both(1.0), Mode.DISCHARGE, 2_000, "dispatch"),
        (1.1, both(1.1, **{field: math.nan}), Mode.FAULT, 0, fault.value),
    ])
    assert [e.kind for e in last.events if isinstance(e, FaultRaised)] == [fault]


@pytest.mark.parametrize("resolution_wh", [10.0, 100.0])
def test_a_coarse_meters_step_after_a_lost_link_bills_what_the_inverter_ran_on_for(resolution_wh):
    """Blind, the core commands 0 W at once, but the inverter runs on at the setpoint it last heard until its own
    revert (60 s here): the meter's step when the link returns is billed, not cut to what the core commanded."""
    c = step(ready(0.0, policy=replace(POLICY, command_horizon_s=60.0)),
             [discharge("e1", 0.0, 0.0, 3_600.0, 11_500)], 0.0).controller
    flowed, heard, heard_at, t = 0.0, 0.0, 0.0, 0.0
    while t < 115.0:
        t = round(t + 0.5, 3)
        link = not 40.0 <= t < 110.0
        power = heard if t - heard_at <= 60.0 else 0.0  # the inverter's own revert
        flowed += power / 3600 * 0.5
        meter = 5_000 + math.floor(flowed / resolution_wh) * resolution_wh
        reading = inverter(t, measured_w=power, tot_wh_inj=meter) if link else inverter(t, comms_ok=False, error="timeout")
        result = step(c, [bms(t), reading], t)
        c = result.controller
        if link:
            heard, heard_at = max(0.0, result.command.setpoint_w), t
    assert c.book.find("e1").meter_wh == pytest.approx(math.floor(flowed / resolution_wh) * resolution_wh)


@pytest.mark.parametrize("snapshot", [
    pytest.param(dict(soc_max_pct=99.0, stale=frozenset({"soc_max_pct"})), id="stale"),
    pytest.param(dict(soc_max_pct=None), id="missing")])
def test_a_pack_whose_soc_max_is_stale_is_charged_no_more_than_one_whose_soc_max_is_missing(snapshot):
    """A stale field is no value (the snapshot's promise): room to charge is not known."""
    charge = replace(discharge("c1", 0.0, 0.0, 3_600.0, 7_000), kind=DispatchKind.CHARGE)
    c = step(step(Controller.start(POLICY, now=0.0), both(0.0, 90.0), 0.0).controller, [charge], 0.0).controller
    for k in range(1, 30):
        c = step(c, both(k / 10, 90.0), k / 10).controller
    assert c.mode is Mode.CHARGE and c.setpoint_w < 0
    result = step(c, [bms(3.0, 90.0, **snapshot), inverter(3.0)], 3.0)
    assert result.controller.mode is not Mode.CHARGE and result.command.setpoint_w == 0


def test_a_reserve_that_is_no_number_keeps_the_reserve_in_force():
    c = step(Controller.start(POLICY, now=0.0), both(0.0), 0.0).controller
    assert c.owner.reserve_pct == POLICY.reserve_pct
    c = step(c, [replace(c.owner, reserve_pct=math.nan, received_at=1.0), *both(1.0)], 1.0).controller
    assert c.owner.reserve_pct == POLICY.reserve_pct  # not 0 %, which max(0, NaN) would give


def test_a_pack_whose_soc_max_is_no_number_is_never_charged():
    charge = replace(discharge("c1", 0.0, 0.0, 100.0, 3_000), kind=DispatchKind.CHARGE)
    run_table([
        (0.0, both(0.0, soc=50.0) + [charge], Mode.CHARGE, 0, "dispatch"),
        (1.0, both(1.0, soc=50.0), Mode.CHARGE, -2_000, "dispatch"),
        (1.1, both(1.1, soc=50.0, soc_max_pct=math.nan), Mode.STANDBY, 0, ""),
    ])


@pytest.mark.parametrize("cancel_first", [False, True], ids=["reading then cancel", "cancel then reading"])
def test_an_event_cancelled_in_a_step_with_a_reading_bills_the_reading_whatever_the_order(cancel_first):
    """Readings tell what happened up to now and a cancel acts at now: the final record holds the energy
    up to the cancel, and the book agrees with it, in whatever order the step's inputs came."""
    c = step(step(Controller.start(POLICY, now=0.0), both(0.0), 0.0).controller,
             [discharge("e1", 0.0, 0.0, 3_600.0, 10_000)], 0.0).controller
    meter, final = 0.0, None
    for t in range(1, 21):
        meter += c.setpoint_w / 3600
        inputs = [bms(float(t)), inverter(float(t), measured_w=c.setpoint_w, tot_wh_inj=meter)]
        if t == 16:
            inputs.insert(0 if cancel_first else 2, DispatchCancel("e1", "test", 16.0))
        result = step(c, inputs, float(t))
        c = result.controller
        final = next((e for e in result.events if isinstance(e, EventEnergy) and e.final), final)
    assert final is not None and final.meter_wh == pytest.approx(c.book.find("e1").meter_wh, abs=1e-3)
    assert final.meter_wh == pytest.approx(sum(10_000 * min(1.0, t / 5) / 3600 for t in range(1, 16)), rel=0.05)


def test_a_charge_request_where_the_inverter_says_it_cannot_charge_is_refused_and_never_commanded():
    """WChaRteMaxRtg 0 (or not implemented) means the inverter cannot charge, for a request as for the storm
    watch: before, the request was judged and clamped against WMaxRtg and charged at 11.5 kW."""
    cannot = dict(w_cha_max_rtg=0.0)
    charge = replace(discharge("c1", 0.0, 0.0, 100.0, 11_500), kind=DispatchKind.CHARGE)
    first, *_ = run_table([
        (0.0, [bms(0.0, 50.0), inverter(0.0, **cannot), charge], Mode.STANDBY, 0, ""),
        (1.0, [bms(1.0, 50.0), inverter(1.0, **cannot)], Mode.STANDBY, 0, ""),
    ])
    answer = first.answer_for("c1")
    assert answer.verdict is Verdict.REJECTED and "inverter charge rating" in answer.detail
