"""The gateway's own stall, as the pure core decides it (issue 10, item 3).

A `Stall` says the runtime saw its monotonic clock jump between two steps: the
gateway itself was paused. The data that went stale meanwhile is its own doing,
so no freshness fault is raised (nothing counts toward the lockout), 0 W is held,
and power is commanded again only on data received after the stall: BMS data a
whole BMS timeout younger than it (frames queued during the pause are decoded
just after it) and an inverter reading taken after it. Without fresh data within
the grace, stale data faults as it always does.
"""

from __future__ import annotations

from core_builders import POLICY, bms, discharge, inverter, ready
from hypothesis import given
from hypothesis import strategies as st

from firmware_py.core import Mode, step
from firmware_py.core.faults import FRESHNESS_FAULTS
from firmware_py.core.replay import replay
from firmware_py.core.types import (
    BmsState,
    FaultKind,
    FaultRaised,
    ReasonCode,
    Resynced,
    Stall,
    Tick,
    Verdict,
)
from firmware_py.journal.steps import decode_batch, encode_batch

GAP = 4.0  # SIGSTOP for 4 s


def discharging(t: float = 0.0):
    """A controller serving an 8 kW event with healthy data at `t`, ramped up."""
    c = ready(t)
    c = step(c, [discharge("peak", t, t, t + 3600, 8_000)], t).controller
    for n in range(1, 60):
        now = t + n * 0.1
        c = step(c, [bms(now), inverter(now, measured_w=c.setpoint_w)], now).controller
    assert c.mode is Mode.DISCHARGE and c.setpoint_w == 8_000
    return c


def resumed(c, at: float, *, with_stall: bool = True):
    """The first step after the pause: a tick, whose own snapshot is as stale as the pause made it."""
    stale = bms(at, stale=frozenset({"soc_min_pct", "max_discharge_w", "bms_state"}))
    items = ([Stall(at, GAP)] if with_stall else []) + [stale, Tick(at)]
    return step(c, items, at)


def test_without_a_stall_input_the_pause_faults_as_the_links_fault():
    """What the runtime prevents by saying "stall": the same gap, read as two links down, latched for
    the hold-off (link faults never count toward the lockout, stall or not)."""
    c = discharging()
    at = c.last_step_at + GAP
    result = resumed(c, at, with_stall=False)
    raised = {e.kind for e in result.events if isinstance(e, FaultRaised)}
    assert raised == {FaultKind.BMS_STALE, FaultKind.INVERTER_COMMS}
    assert result.controller.mode is Mode.FAULT and result.controller.faults.raised_times == ()
    now = at + POLICY.bms_timeout_s
    held = step(result.controller, [bms(now), inverter(now)], now)
    assert held.controller.mode is Mode.FAULT and held.command.setpoint_w == 0  # for the whole hold-off


def test_a_stall_raises_no_fault_holds_zero_and_resumes_on_fresh_data():
    c = discharging()
    at = c.last_step_at + GAP
    result = resumed(c, at)
    c = result.controller
    assert not [e for e in result.events if isinstance(e, FaultRaised)]
    assert c.faults.raised_times == () and c.resyncing
    assert result.command.setpoint_w == 0 and result.command.reason.startswith("resync: the gateway stalled 4.0 s")

    # Frames queued during the pause, decoded (and stamped) just after it: not yet the present.
    backlog = step(c, [bms(at + 0.01), inverter(at + 0.02, measured_w=0.0)], at + 0.02)
    assert backlog.controller.resyncing and backlog.command.setpoint_w == 0
    c = backlog.controller

    # A whole BMS timeout later, data that stayed fresh that long: commanding again, from 0 at the ramp rate.
    now = at + POLICY.bms_timeout_s
    result = step(c, [bms(now), inverter(now, measured_w=0.0)], now)
    (done,) = [e for e in result.events if isinstance(e, Resynced)]
    assert done.fresh and done.gap_s == GAP and done.waited_s == POLICY.bms_timeout_s
    assert not result.controller.resyncing
    assert result.controller.mode is Mode.DISCHARGE
    assert 0 <= result.command.setpoint_w <= POLICY.ramp_w_per_s * 0.5
    assert not [e for e in result.events if isinstance(e, FaultRaised)]


def test_the_inverter_must_be_read_after_the_stall():
    c = resumed(discharging(), at := 10.0).controller
    now = at + 1.0
    result = step(c, [bms(now), inverter(at - 0.001)], now)  # a reading that crossed the pause
    assert result.controller.resyncing and result.command.setpoint_w == 0
    result = step(result.controller, [inverter(now + 0.1)], now + 0.1)
    assert not result.controller.resyncing


def test_repeated_stalls_never_lock_the_truck_out():
    c = discharging()
    for _ in range(POLICY.lockout_faults + 2):
        at = c.last_step_at + GAP
        c = resumed(c, at).controller
        now = at + POLICY.bms_timeout_s
        c = step(c, [bms(now), inverter(now)], now).controller
        assert not c.resyncing
    assert not c.faults.locked_out and c.faults.raised_times == ()
    assert c.mode is Mode.DISCHARGE


def test_links_that_stay_down_fault_after_the_grace_and_count():
    c = resumed(discharging(), at := 10.0).controller
    before_grace = at + POLICY.resync_grace_s - 0.1
    result = step(c, [bms(before_grace, stale=frozenset({"soc_min_pct"})), Tick(before_grace)], before_grace)
    assert result.controller.resyncing and not [e for e in result.events if isinstance(e, FaultRaised)]
    end = at + POLICY.resync_grace_s
    result = step(result.controller, [bms(end, stale=frozenset({"soc_min_pct"})), Tick(end)], end)
    (gave_up,) = [e for e in result.events if isinstance(e, Resynced)]
    assert not gave_up.fresh
    raised = {e.kind for e in result.events if isinstance(e, FaultRaised)}
    assert raised == {FaultKind.BMS_STALE, FaultKind.INVERTER_COMMS}
    assert result.controller.mode is Mode.FAULT and result.command.setpoint_w == 0


def test_a_fault_latched_before_the_stall_stays_latched():
    c = discharging()
    now = c.last_step_at + 0.1
    c = step(c, [bms(now, max_temp_c=75.0), inverter(now)], now).controller
    c = step(c, [inverter(now + 0.2, comms_ok=False, error="timeout")], now + 0.2).controller
    latched = set(c.faults.kinds)
    assert {FaultKind.OVER_TEMP, FaultKind.INVERTER_COMMS} <= latched
    result = resumed(c, now + 0.2 + GAP)
    assert set(result.controller.faults.kinds) == latched
    # Still present as far as the latch knows: its hold-off must not start counting during the resync.
    gone_since = {latch.kind: latch.gone_since for latch in result.controller.faults.latches}
    assert gone_since[FaultKind.INVERTER_COMMS] is None


def test_dispatch_during_the_resync_is_refused_with_no_data():
    c = resumed(ready(0.0), at := 20.0).controller
    result = step(c, [discharge("late", at, at, at + 600)], at + 0.1)
    answer = result.answer_for("late")
    assert answer.verdict is Verdict.REJECTED and answer.reason is ReasonCode.NO_DATA
    assert "stall" in answer.detail


def test_a_stall_replays_from_the_journal_exactly():
    """The runtime journals the Stall with the step it led: a replay decides the same."""
    start = discharging()
    at = start.last_step_at + GAP
    steps = [(at, (Stall(at, GAP), bms(at, stale=frozenset({"soc_min_pct"})), Tick(at))),
             (at + 0.1, (bms(at + 0.1), inverter(at + 0.1))),
             (at + 0.6, (bms(at + 0.6), inverter(at + 0.6)))]
    live = list(replay(start, steps))
    again = list(replay(start, decode_batch(encode_batch(steps))))
    assert [r.events for r in again] == [r.events for r in live]
    assert [r.command for r in again] == [r.command for r in live]
    assert any(isinstance(e, Resynced) and e.fresh for e in live[-1].events)


@given(gap=st.floats(0.3, 600), waits=st.lists(st.floats(0.01, 0.3), min_size=1, max_size=40),
       inverter_lag=st.floats(0, 3), stale_bms=st.booleans())
def test_from_any_stall_zero_until_fresh_data_and_no_freshness_fault_within_the_grace(
        gap, waits, inverter_lag, stale_bms):
    c = discharging()
    at = c.last_step_at + gap
    result = step(c, [Stall(at, gap), bms(at, stale=frozenset({"soc_min_pct"}) if stale_bms else frozenset()),
                      Tick(at)], at)
    now, c = at, result.controller
    for wait in waits:
        if not c.resyncing:
            break
        now += wait
        items = [bms(now)] + ([inverter(now)] if now - at >= inverter_lag else [])
        result = step(c, items, now)
        c = result.controller
        fresh_since_stall = (now - at >= POLICY.bms_timeout_s and now - at >= inverter_lag)
        if c.resyncing:
            assert result.command.setpoint_w == 0
            assert not fresh_since_stall or now - at >= POLICY.resync_grace_s
        else:
            assert fresh_since_stall
        assert not [e for e in result.events if isinstance(e, FaultRaised) and e.kind in FRESHNESS_FAULTS]
    assert not c.faults.locked_out


def test_a_resync_in_a_mode_that_commands_nothing_leaves_the_mode_its_own_reason_once_over():
    """`status` said "resync: ... waiting for fresh BMS and inverter data" for as long as a fault held the
    mode after the resync had ended: a mode without a handler carried the clamp's override as its reason."""
    c = discharging()
    at = c.last_step_at + GAP
    faulted = step(c, [bms(at, bms_state=BmsState.FAULT), inverter(at)], at).controller
    assert faulted.mode is Mode.FAULT
    c = step(faulted, [Stall(at + GAP, GAP), Tick(at + GAP)], at + GAP).controller
    assert c.resyncing and c.reason.startswith("resync:")
    now = at + GAP + POLICY.bms_timeout_s
    result = step(c, [bms(now, bms_state=BmsState.FAULT), inverter(now)], now)
    assert not result.controller.resyncing and result.controller.mode is Mode.FAULT
    assert result.command.setpoint_w == 0 and result.command.reason == faulted.reason
