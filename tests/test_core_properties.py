"""Any state × any input: the safety claims hold from every mode, for every kind of input.

Like h11's tests, the pure core lets us put the controller straight into any
mode with any remembered data, then hit it with one arbitrary step.
"""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from core_builders import POLICY, bms, inverter
from firmware_py.core import Controller, Mode, step
from firmware_py.core.faults import FaultBook, Latch, bms_usable, inverter_usable
from firmware_py.core.requests import Booked, RequestBook
from firmware_py.core.types import (
    BmsState,
    ContactorState,
    DispatchAnswer,
    DispatchCancel,
    DispatchKind,
    DispatchRequest,
    InstallerReset,
    InverterState,
    JournalHealth,
    OwnerSettings,
    PackContactor,
    ReasonCode,
    SiteLimit,
    Stall,
    Tick,
    Verdict,
)

T = 100.0
finite = st.floats(-1e6, 1e6, allow_nan=False)

bms_snapshots = st.builds(
    lambda age, soc, dcl, state, contactor, pack, temp, stale: bms(
        T - age, soc, max_discharge_w=dcl, max_charge_w=dcl, bms_state=state, contactor_state=contactor,
        pack_contactor_pos=pack, max_temp_c=temp, stale=frozenset(stale)),
    age=st.floats(0, 2), soc=st.floats(0, 100), dcl=st.floats(0, 300_000),
    state=st.sampled_from(list(BmsState)), contactor=st.sampled_from(list(ContactorState)),
    pack=st.sampled_from(list(PackContactor)), temp=st.floats(-40, 90),
    stale=st.lists(st.sampled_from(["soc_min_pct", "max_discharge_w", "bms_state", "max_temp_c"]), max_size=2))

inverter_statuses = st.builds(
    lambda age, ok, state, outage, ac, discharge, charge, entering: inverter(
        T - age, comms_ok=ok, error=None if ok else "timeout", inv_state=state, grid_outage=outage,
        w_max_rtg=ac, w_discha_max_rtg=discharge, w_cha_max_rtg=charge, enter_service_s=entering),
    age=st.floats(0, 5), ok=st.booleans(), state=st.sampled_from(list(InverterState)), outage=st.booleans(),
    ac=st.floats(0, 20_000), discharge=st.none() | st.just(0.0) | st.floats(0, 20_000),  # None: not reported
    charge=st.floats(0, 20_000), entering=st.sampled_from([0.0, 0.0, 0.0, 120.0]))

site_limits = st.builds(SiteLimit, st.just(T), st.sampled_from(["sunspec", "owner"]),
                        st.none() | st.floats(0, 20_000) | st.just(math.nan))

requests = st.builds(
    lambda rid, kind, target, start, length, ramp: DispatchRequest(
        rid, "agg", kind, target, T + start, T + start + length, received_at=T, ramp_w_per_s=ramp),
    rid=st.sampled_from(["a", "b", ""]), kind=st.sampled_from(list(DispatchKind)), target=finite | st.just(math.nan),
    start=st.floats(-100, 100), length=st.floats(-10, 20_000) | st.just(math.inf),
    ramp=st.none() | st.floats(-10, 10_000))

owners = st.builds(
    lambda reserve, out, dep, soc, storm, storm_until: OwnerSettings(
        reserve, T, opt_out_until=out, departure_at=dep, departure_soc_pct=soc,
        storm_watch_floor_pct=storm, storm_watch_until=None if storm is None else storm_until),
    reserve=st.floats(0, 100), out=st.none() | st.just(math.inf) | st.floats(T - 10, T + 10),
    dep=st.none() | st.floats(T, T + 20_000), soc=st.floats(0, 100),
    storm=st.none() | st.floats(0, 100), storm_until=st.floats(T - 10, T + 20_000))

journal_reports = st.builds(JournalHealth, st.just(T), st.booleans(), st.sampled_from(["", "disk full"]))

inputs = st.one_of(bms_snapshots, inverter_statuses, requests, owners, st.just(Tick(T)), journal_reports,
                   st.just(InstallerReset(T)), st.builds(DispatchCancel, st.sampled_from(["a", "b"]),
                                                         st.just("agg"), st.just(T)),
                   st.builds(Stall, st.just(T), st.floats(0.3, 600)), site_limits)


@st.composite
def controllers(draw):
    """A controller in any mode, with any remembered data, latches and requests."""
    c = Controller.start(POLICY)
    latches = draw(st.lists(st.sampled_from(["bms_fault", "over_temp", "inverter_fault"]), unique=True, max_size=2))
    book = RequestBook()
    if draw(st.booleans()):
        target = draw(st.floats(100, 20_000))
        req = DispatchRequest("a", "agg", draw(st.sampled_from([DispatchKind.DISCHARGE, DispatchKind.CHARGE])),
                              target, T - 10, T + 3600, received_at=T - 20)
        book = book.add(Booked(req, DispatchAnswer("a", T - 20, Verdict.ACCEPTED)), T - 20)
    return replace(
        c, mode=draw(st.sampled_from(list(Mode))), bms=draw(bms_snapshots), inverter=draw(inverter_statuses),
        bms_seen=True, inverter_seen=True, setpoint_w=draw(st.floats(-20_000, 20_000)), last_step_at=T - 0.1,
        faults=FaultBook(tuple(Latch(k, T - 1, "") for k in latches), (), draw(st.booleans())), book=book)


@given(controllers(), st.lists(inputs, max_size=4))
def test_every_command_is_within_every_limit(c, items):
    result = step(c, items, T)
    after, w = result.controller, result.command.setpoint_w
    assert math.isfinite(w) and result.command.reason
    if w == 0:
        return
    assert not after.resyncing, "power commanded while resyncing after a stall"
    assert bms_usable(after.bms, T, POLICY) and inverter_usable(after.inverter, T, POLICY)
    assert not after.faults.latches and not after.faults.locked_out
    assert after.bms.energy_path_closed()
    inv = after.inverter
    assert abs(w) <= (after.bms.max_discharge_w if w > 0 else after.bms.max_charge_w) + 1e-6
    storage_rating = inv.w_cha_max_rtg if w < 0 else math.inf if inv.w_discha_max_rtg is None else inv.w_discha_max_rtg
    assert abs(w) <= storage_rating + 1e-6, "above the storage rating (0 W reported: it cannot)"
    assert abs(w) <= inv.w_max_rtg + 1e-6 or inv.w_max_rtg == 0, "above the inverter's AC rating"
    assert abs(w) <= (POLICY.max_discharge_w if w > 0 else POLICY.max_charge_w) + 1e-6
    if after.mode is not Mode.BACKUP:  # a site controller's limit: what goes to the grid
        assert abs(w) <= after.site_limit_w(discharge=w > 0) + 1e-6
        assert after.inverter.enter_service_s == 0, "power during the inverter's enter-service delay"
    if w > 0:
        assert after.bms.soc_min_pct > after.floor_pct(T)
        assert after.mode in (Mode.DISCHARGE, Mode.BACKUP)
        if after.mode is Mode.DISCHARGE:
            assert w <= after.book.in_force(T).target_w + 1e-6
            assert not after.owner.opted_out(T, after.serving_id)
    else:
        assert after.mode is Mode.CHARGE
        in_force = after.book.in_force(T)
        charge_asked = in_force is not None and in_force.request.kind is DispatchKind.CHARGE
        assert charge_asked or (after.owner.storm_watch(T) is not None and not after.outage(T)), \
            "charging with neither a charge request nor a storm watch"


@given(controllers(), st.lists(inputs, max_size=4), st.booleans(), st.sampled_from(["disk full", "locked"]))
def test_while_the_journal_fails_only_backup_moves_energy(c, items, failing_before, detail):
    """Energy the gateway cannot account for is not delivered: from any state, once the newest journal
    report says it fails (remembered from before, or arriving in this step), dispatch holds at 0 W;
    only the islanded home's backup, which is never credited, may draw on the pack."""
    if failing_before:
        c = replace(c, journal=JournalHealth(T - 1, False, detail))
        items = [i for i in items if not isinstance(i, JournalHealth)]
    else:
        items = [*items, JournalHealth(T, False, detail)]
    result = step(c, items, T)
    assert result.controller.mode not in (Mode.DISCHARGE, Mode.CHARGE)
    if result.command.setpoint_w != 0:
        assert result.controller.mode is Mode.BACKUP and result.command.setpoint_w > 0


@given(controllers(), st.lists(inputs, max_size=4))
def test_every_request_gets_exactly_one_answer(c, items):
    result = step(c, items, T)
    asked = [i.id for i in items if isinstance(i, DispatchRequest)]
    answered = [e.request_id for e in result.events if isinstance(e, DispatchAnswer)]
    assert answered == asked
    for e in result.events:
        if isinstance(e, DispatchAnswer) and e.verdict is Verdict.REJECTED:
            assert e.reason is not None and e.detail
        if isinstance(e, DispatchAnswer) and e.reason is ReasonCode.STORM_WATCH:
            assert result.controller.owner.storm_watch(T) is not None, "STORM_WATCH without a storm watch"


@given(controllers(), st.lists(inputs, max_size=4))
def test_the_mode_is_settled(c, items):
    """Stepping again at the same instant with nothing new changes nothing: one step settles."""
    first = step(c, items, T).controller
    again = step(first, [], T)
    assert again.controller.mode is first.mode
    assert not [e for e in again.events if hasattr(e, "to_state")]
