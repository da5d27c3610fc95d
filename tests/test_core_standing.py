"""Issue 12 in the core: open-ended requests, the site limit for every source, the enter-service
delay, and `improvable` (which refused or capped requests a new revision would now serve better)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from core_builders import POLICY, bms, discharge, inverter, ready
from firmware_py.core import Controller, Mode, Policy, step, telemetry
from firmware_py.core.answers import better, improvable
from firmware_py.core.floor import envelope_takes_over_wh
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    OwnerSettings,
    ReasonCode,
    SiteLimit,
    Tick,
    Verdict,
)

SMALL = Policy(usable_capacity_wh=20_000, reserve_pct=40)


def answer_of(result, request_id: str) -> DispatchAnswer:
    answer = result.answer_for(request_id)
    assert answer is not None
    return answer


def both(t: float, soc: float = 80.0, **inv) -> list:
    return [bms(t, soc), inverter(t, **inv)]


# ---------------------------------------------------------------- open-ended


def test_an_open_ended_request_is_accepted_at_full_power_where_a_window_would_be_budgeted():
    """20 kWh at 45 %, floor 42 %: 570 Wh above it. 11.5 kW for 15 minutes is capped to a trickle;
    the same power with no end is accepted, and the envelope ends it at the floor."""
    c = ready(0.0, soc=45.0, policy=SMALL)
    windowed = answer_of(step(c, [discharge("w", 0.0, 0, 900)], 0.0), "w")
    assert windowed.verdict is Verdict.CAPPED and windowed.cap_w < 2_500
    r = step(c, [discharge("o", 0.0, 0, math.inf)], 0.0)
    assert answer_of(r, "o").verdict is Verdict.ACCEPTED
    assert r.controller.mode is Mode.DISCHARGE


def test_an_open_ended_request_at_the_floor_is_refused_and_a_power_limit_caps_it():
    at_floor = ready(0.0, soc=42.3, policy=SMALL)  # inside the entry hysteresis: nothing can start
    refused = answer_of(step(at_floor, [discharge("o", 0.0, 0, math.inf)], 0.0), "o")
    assert (refused.verdict, refused.reason) == (Verdict.REJECTED, ReasonCode.INSUFFICIENT_ENERGY)
    c = step(ready(0.0, soc=80.0), [bms(0.0, max_discharge_w=4_000)], 0.0).controller
    capped = answer_of(step(c, [discharge("o", 0.0, 0, math.inf)], 0.0), "o")
    assert (capped.verdict, capped.cap_w, capped.detail) == (Verdict.CAPPED, 4_000, "capped by BMS limit")


def test_telemetry_says_when_the_envelope_begins_to_reduce_an_open_ended_discharge():
    c = step(ready(0.0, soc=45.0, policy=SMALL), [discharge("o", 0.0, 0, math.inf)], 0.0).controller
    t = telemetry(c, 0.0)
    threshold = envelope_takes_over_wh(SMALL, 11_500)
    assert t.envelope_in_s == pytest.approx((t.available_wh - threshold) / 11_500 * 3600)
    assert 100 < t.envelope_in_s < 200  # ~540 Wh at 11.5 kW
    assert telemetry(ready(0.0), 0.0).envelope_in_s is None  # nothing served


# ---------------------------------------------------------------- site limit


def test_a_site_limit_caps_every_source_in_the_answer_and_the_clamp_and_lifts_again():
    c = ready(0.0)
    c = step(c, [SiteLimit(0.0, "sunspec", 4_000)], 0.0).controller
    capped = answer_of(step(c, [discharge("adr", 0.0, 0, 600)], 0.0), "adr")
    assert (capped.verdict, capped.cap_w, capped.detail) == (Verdict.CAPPED, 4_000, "capped by site limit")
    c = step(ready(0.0), [discharge("adr", 0.0, 0, 600)], 0.0).controller  # accepted before any limit
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        c = step(c, both(t), t).controller
    assert c.setpoint_w == pytest.approx(11_500)
    r = step(c, [SiteLimit(6.5, "sunspec", 3_000), *both(6.5)], 6.5)
    assert (r.command.setpoint_w, r.command.reason) == (3_000, "clamped: site limit")
    assert telemetry(r.controller, 6.5).site_limit_w == 3_000
    r = step(r.controller, [SiteLimit(7.0, "sunspec", None), *both(7.0)], 7.0)
    assert r.command.setpoint_w > 3_000 and r.controller.site_limit_w() == POLICY.max_discharge_w


def test_the_lowest_site_limit_of_every_source_holds_and_nonsense_counts_as_zero():
    c = ready(0.0)
    c = step(c, [SiteLimit(0.0, "a", 6_000), SiteLimit(0.0, "b", 5_000)], 0.0).controller
    assert c.site_limit_w() == 5_000 and c.site_limit_w(discharge=False) == 5_000
    c = step(c, [SiteLimit(1.0, "b", math.nan)], 1.0).controller
    assert c.site_limit_w() == 0.0


def test_a_site_limit_does_not_cut_the_home_off_in_an_outage():
    c = step(ready(0.0), [SiteLimit(0.0, "sunspec", 0.0)], 0.0).controller
    r = step(c, both(1.0, grid_outage=True), 1.0)
    assert r.controller.mode is Mode.BACKUP and r.command.setpoint_w == POLICY.max_discharge_w


# ---------------------------------------------------------------- enter service


def test_during_the_enter_service_delay_dispatch_is_refused_saying_when_export_can_resume():
    c = step(ready(0.0), both(1.0, enter_service_s=212.4), 1.0).controller
    r = step(c, [discharge("e", 1.0, 1.0, 600)], 1.0)
    refused = answer_of(r, "e")
    assert (refused.verdict, refused.reason) == (Verdict.REJECTED, ReasonCode.ENTER_SERVICE)
    assert "in 213 s" in refused.detail
    accepted = step(ready(0.0), [discharge("e", 0.0, 0, 600)], 0.0).controller
    r = step(accepted, both(1.0, enter_service_s=30.0), 1.0)
    assert r.command.setpoint_w == 0 and r.command.reason.startswith("enter service: grid back")


# ---------------------------------------------------------------- improvable


def test_a_request_refused_while_starting_becomes_improvable_when_data_arrives():
    c = Controller.start(POLICY)
    r = step(c, [discharge("s", 0.0, 0, math.inf)], 0.0)
    assert answer_of(r, "s").reason is ReasonCode.NO_DATA
    assert improvable(r.controller, 0.0) == frozenset()
    c = step(r.controller, both(0.5), 0.5).controller
    assert improvable(c, 0.5) == {"s"} and telemetry(c, 0.5).improvable == ("s",)
    again = replace(c.book.find("s").request, revision=1, received_at=0.5)
    r = step(c, [again], 0.5)
    assert answer_of(r, "s").verdict is Verdict.ACCEPTED and improvable(r.controller, 0.5) == frozenset()


def test_a_request_the_owner_stopped_becomes_improvable_when_the_opt_out_is_revoked():
    c = step(ready(0.0), [discharge("s", 0.0, 0, math.inf)], 0.0).controller
    out = OwnerSettings(reserve_pct=40, received_at=1.0, opt_out_until=math.inf)
    r = step(c, [out, *both(1.0)], 1.0)
    assert [e.reason for e in r.events if isinstance(e, DispatchEnded)] == ["owner opted out"]
    assert improvable(r.controller, 1.0) == frozenset()
    back = OwnerSettings(reserve_pct=40, received_at=2.0)
    assert improvable(step(r.controller, [back, *both(2.0)], 2.0).controller, 2.0) == {"s"}


def test_cancelled_refusals_ended_events_and_windows_not_yet_open_are_never_improvable():
    c = Controller.start(POLICY)
    c = step(c, [discharge("gone", 0.0, 0, 600), discharge("later", 0.0, 100, 700),
                 discharge("done", 0.0, 0, math.inf)], 0.0).controller
    c = step(c, [DispatchCancel("gone", "test", 0.1), *both(0.5)], 0.5).controller
    assert improvable(c, 0.5) == {"done"}
    c = step(c, both(100.0), 100.0).controller
    assert improvable(c, 100.0) == {"done", "later"}  # its window opened with nothing in its way


def test_a_cancelled_refusal_sent_again_unchanged_in_its_window_is_judged_anew():
    """An event refused NO_DATA at start-up, cancelled because one VTN listing lacked it, then listed again
    unchanged, got its stale NO_DATA back with the gateway ready, and stayed withdrawn: never asked again for."""
    c = Controller.start(POLICY)
    event = discharge("evt", 0.0, 0, 3_600, 5_000)
    r = step(c, [event], 0.0)
    assert answer_of(r, "evt").reason is ReasonCode.NO_DATA
    c = step(r.controller, both(0.5), 0.5).controller
    c = step(c, [DispatchCancel("evt", "test", 1.0), *both(1.0)], 1.0).controller
    assert improvable(c, 1.0) == frozenset()  # withdrawn: never asked again for by itself
    r = step(c, [replace(event, received_at=2.0), *both(2.0)], 2.0)
    assert answer_of(r, "evt").verdict is Verdict.ACCEPTED and r.controller.serving_id == "evt"
    c = step(r.controller, [DispatchCancel("evt", "test", 3.0), *both(3.0)], 3.0).controller
    assert c.serving_id is None  # served again, it is the source's to end as any other


def test_a_capped_request_is_improvable_only_when_the_cap_would_rise_by_a_margin():
    c = step(ready(0.0), [SiteLimit(0.0, "sunspec", 4_000), discharge("s", 0.0, 0, math.inf)], 0.0).controller
    assert improvable(c, 0.0) == frozenset()
    c = step(c, [SiteLimit(1.0, "sunspec", 4_050), *both(1.0)], 1.0).controller
    assert improvable(c, 1.0) == frozenset()  # 50 W more is noise, not a cleared reason
    c = step(c, [SiteLimit(2.0, "sunspec", None), *both(2.0)], 2.0).controller
    assert improvable(c, 2.0) == {"s"}


@pytest.mark.parametrize("old, new, expected", [
    (DispatchAnswer.refused("x", 0, ReasonCode.NO_DATA, ""), DispatchAnswer.accepted("x", 1), True),
    (DispatchAnswer.refused("x", 0, ReasonCode.NO_DATA, ""), DispatchAnswer.refused("x", 1, ReasonCode.FAULT, ""),
     False),
    (DispatchAnswer.capped("x", 0, 3_000), DispatchAnswer.capped("x", 1, 3_150), True),
    (DispatchAnswer.capped("x", 0, 3_000), DispatchAnswer.capped("x", 1, 3_149), False),
    (DispatchAnswer.accepted("x", 0), DispatchAnswer.accepted("x", 1), False),
])
def test_better_means_a_refusal_lifted_or_a_cap_raised_by_a_margin(old, new, expected):
    assert better(new, old) is expected


def test_a_cancel_journals_the_reason_its_source_gave():
    c = step(ready(0.0), [discharge("e", 0.0, 0, 600)], 0.0).controller
    r = step(c, [DispatchCancel("e", "test", 1.0, "implicitly cancelled: missing from the VTN's distribution"),
                 Tick(1.0)], 1.0)
    [ended] = [e for e in r.events if isinstance(e, DispatchEnded)]
    assert ended.reason == "cancelled by test: implicitly cancelled: missing from the VTN's distribution"


def test_site_limits_cancel_reasons_and_the_enter_service_delay_replay_from_the_journal_exactly():
    """What issue 12 added to the core's inputs is journaled with the steps: a replay decides the same."""
    from firmware_py.core.replay import replay
    from firmware_py.journal.steps import decode_batch, encode_batch

    start = ready(0.0)
    steps = [(1.0, (*both(1.0), discharge("e", 1.0, 1.0, math.inf))),
             (2.0, (SiteLimit(2.0, "sunspec", 1_000.0), *both(2.0))),
             (3.0, (SiteLimit(3.0, "sunspec", None), *both(3.0, enter_service_s=42.0))),
             (4.0, (DispatchCancel("e", "test", 4.0, "implicitly cancelled"), *both(4.0)))]
    live = list(replay(start, steps))
    again = list(replay(start, decode_batch(encode_batch(steps))))
    assert [r.events for r in again] == [r.events for r in live]
    assert [r.command for r in again] == [r.command for r in live]
    assert live[1].command.reason == "clamped: site limit" and live[2].command.reason.startswith("enter service")
