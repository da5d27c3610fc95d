"""Price-responsive mode in the pure core: one answer per published price, discharge above the
owner's threshold under every rule a request obeys, aggregator precedence, and a daily budget
that the billed energy stops at."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import date, timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core_builders import POLICY, Run, bms, discharge, inverter, ready
from firmware_py.core import Controller, Mode, step
from firmware_py.core.prices import BUDGET_SPENT_END, MAX_PRICE_PER_KWH, budget_left_wh
from firmware_py.core.types import (
    CalendarDay,
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    OwnerSettings,
    PriceInterval,
    PriceKind,
    ReasonCode,
    Verdict,
)

HOUR = 3600.0
FIRST_DAY = date(2026, 12, 2)


def owner(threshold: float | None = 0.30, budget_wh: float = 5_000.0, **changes) -> OwnerSettings:
    return OwnerSettings(reserve_pct=40, received_at=0.0, price_threshold_per_kwh=threshold,
                         price_max_wh_per_day=budget_wh, **changes)


def price(id: str = "p1", per_kwh: float = 0.42, start: float = 0.0, end: float = HOUR, t: float = 0.0,
          **changes) -> PriceInterval:
    base = PriceInterval(id, "oadr3", "tou", PriceKind.EXPORT_PRICE, per_kwh, start, end, received_at=t)
    return replace(base, **changes)


def priced(settings: OwnerSettings, t: float = 0.0, soc: float = 80.0) -> Controller:
    c = ready(t, soc)
    return step(c, [replace(settings, received_at=t), CalendarDay(t, "2026-12-02")], t).controller


def answer_of(result, id: str) -> DispatchAnswer:
    found = result.answer_for(id)
    assert found is not None, f"no answer for {id}"
    return found


# ---------------------------------------------------------------- the answer


def test_a_price_above_the_threshold_is_accepted_and_discharged_for():
    run = Run(priced(owner()))
    reply = answer_of(run.feed(price()), "p1")
    assert reply.verdict is Verdict.ACCEPTED
    assert "0.42 per kWh meets the threshold 0.3" in reply.detail and "5000 Wh" in reply.detail
    run.run(10)
    assert run.c.mode is Mode.DISCHARGE and run.c.serving_id == "p1"
    assert run.applied_w == POLICY.max_discharge_w  # no price power set: as much as the limits allow
    assert run.c.reason.startswith("price p1: 0.42 per kWh")


def test_a_price_below_the_threshold_is_refused_and_nothing_moves():
    run = Run(priced(owner(threshold=0.50)))
    reply = answer_of(run.feed(price()), "p1")
    assert (reply.verdict, reply.reason) == (Verdict.REJECTED, ReasonCode.BELOW_THRESHOLD)
    assert "0.42 per kWh is below the owner's threshold 0.5" in reply.detail
    run.run(10)
    assert run.c.mode is Mode.STANDBY and run.applied_w == 0


def test_the_threshold_itself_counts_as_crossed():
    run = Run(priced(owner(threshold=0.42)))
    assert answer_of(run.feed(price()), "p1").verdict is Verdict.ACCEPTED


def test_mode_off_and_the_other_kind_are_refused_with_their_own_reasons():
    off = Run(priced(owner(threshold=None)))
    assert answer_of(off.feed(price()), "p1").reason is ReasonCode.PRICE_MODE_OFF
    no_budget = Run(priced(owner(budget_wh=0)))
    assert answer_of(no_budget.feed(price()), "p1").reason is ReasonCode.PRICE_MODE_OFF
    import_price = Run(priced(owner()))
    reply = answer_of(import_price.feed(price(kind=PriceKind.PRICE)), "p1")
    assert reply.reason is ReasonCode.PRICE_KIND and "EXPORT_PRICE, not PRICE" in reply.detail
    follows_import = Run(priced(owner(price_kind=PriceKind.PRICE)))
    assert answer_of(follows_import.feed(price(kind=PriceKind.PRICE)), "p1").verdict is Verdict.ACCEPTED


def test_the_owner_price_power_is_the_target():
    run = Run(priced(owner(price_power_w=4_000)))
    run.feed(price())
    run.run(10)
    assert run.applied_w == 4_000


@pytest.mark.parametrize("revision", [None, "1", 1.5])
def test_a_price_whose_revision_is_no_count_is_invalid_and_never_booked(revision):
    """Booked, it broke the next step that published its id again (a TypeError: no answer at all)."""
    run = Run(priced(owner()))
    reply = answer_of(run.feed(price(revision=revision)), "p1")
    assert reply.reason is ReasonCode.INVALID and "revision" in reply.detail
    assert answer_of(run.feed(price()), "p1").verdict is Verdict.ACCEPTED


def test_malformed_expired_and_reused_ids_are_refused():
    run = Run(priced(owner()))
    assert answer_of(run.feed(price("bad", per_kwh=math.nan)), "bad").reason is ReasonCode.INVALID
    assert answer_of(run.feed(price("back", start=10, end=5)), "back").reason is ReasonCode.INVALID
    assert answer_of(run.feed(price(" ")), " ").reason is ReasonCode.INVALID
    run.t = 2 * HOUR
    assert answer_of(run.feed(price("old")), "old").reason is ReasonCode.EXPIRED
    run.feed(discharge("d1", run.t, run.t, run.t + 60))
    reply = answer_of(run.feed(price("d1", start=run.t, end=run.t + HOUR, t=run.t)), "d1")
    assert reply.reason is ReasonCode.DUPLICATE and "dispatch request" in reply.detail
    run.feed(price("p9", start=run.t, end=run.t + HOUR, t=run.t))
    reply = answer_of(run.feed(discharge("p9", run.t, run.t, run.t + 60)), "p9")
    assert reply.reason is ReasonCode.DUPLICATE and "published price" in reply.detail


def test_a_price_beyond_any_tariff_is_refused_as_invalid_with_its_reason_and_a_large_real_one_is_not():
    """1e27 per kWh is finite, yet no amount priced with it can be stated to the cent: it is the
    publisher's fault, and is refused like a price that is no number."""
    run = Run(priced(owner()))
    for bad in (1e27, -1e27, MAX_PRICE_PER_KWH * 1.01):
        reply = answer_of(run.feed(price(f"huge{bad}", per_kwh=bad)), f"huge{bad}")
        assert reply.reason is ReasonCode.INVALID and "price_per_kwh" in reply.detail
    assert answer_of(run.feed(price("dear", per_kwh=MAX_PRICE_PER_KWH)), "dear").verdict is not Verdict.REJECTED


def test_the_same_price_again_gets_the_same_answer_and_other_content_is_refused():
    run = Run(priced(owner()))
    first = answer_of(run.feed(price()), "p1")
    run.run(5)
    again = answer_of(run.feed(price(t=run.t)), "p1")
    assert (again.verdict, again.detail) == (first.verdict, first.detail)
    changed = answer_of(run.feed(price(per_kwh=0.10, t=run.t)), "p1")
    assert changed.reason is ReasonCode.DUPLICATE


def test_a_revision_below_the_threshold_ends_the_event_with_its_energy():
    run = Run(priced(owner()))
    run.feed(price())
    run.run(60)
    reply = answer_of(run.feed(price(per_kwh=0.10, revision=1, t=run.t)), "p1")
    assert reply.reason is ReasonCode.BELOW_THRESHOLD
    assert "revision 1 refused" in run.ended("p1").reason
    assert run.final("p1").meter_wh > 0
    run.run(5)
    assert run.applied_w == 0


def test_a_price_revised_below_the_threshold_and_back_above_continues_its_account():
    """Served again, the event's account started at 0 Wh: its last record, what statements bill, left out
    what it had delivered before the revision that ended it."""
    run = Run(priced(owner(budget_wh=50_000)))
    run.feed(price())
    run.run(60)
    run.feed(price(per_kwh=0.10, revision=1, t=run.t))
    delivered = run.c.book.find("p1").meter_wh
    assert delivered > 0
    run.run(5)
    reply = answer_of(run.feed(price(per_kwh=0.60, revision=2, t=run.t)), "p1")
    assert reply.verdict is Verdict.ACCEPTED
    assert run.c.book.find("p1").meter_wh == pytest.approx(delivered)
    run.run(30)
    run.feed(price(per_kwh=0.10, revision=3, t=run.t))
    last = [e for e in run.events if getattr(e, "request_id", None) == "p1" and hasattr(e, "meter_wh")][-1]
    assert last.final and last.meter_wh == pytest.approx(run.meter_wh, abs=1e-2)


def test_floor_storm_watch_opt_out_and_faults_govern_a_price_like_a_request():
    near_floor = Run(priced(owner(), soc=42.02))  # floor 42 %: 23 Wh above it, too little
    assert answer_of(near_floor.feed(price()), "p1").reason is ReasonCode.INSUFFICIENT_ENERGY
    storm = Run(priced(owner(storm_watch_floor_pct=79.9, storm_watch_until=10 * HOUR)))
    assert answer_of(storm.feed(price()), "p1").reason is ReasonCode.STORM_WATCH
    opted = Run(priced(owner(opt_out_until=math.inf)))
    assert answer_of(opted.feed(price()), "p1").reason is ReasonCode.OPTED_OUT
    stale = Run(priced(owner()))
    stale.t = 30.0  # no data for 30 s
    assert answer_of(stale.feed(price(t=30.0)), "p1").reason is ReasonCode.NO_DATA


def test_the_reserve_ends_a_price_event_like_any_other():
    run = Run(priced(owner(budget_wh=50_000)), soc=43.0)
    assert answer_of(run.feed(price()), "p1").verdict is not Verdict.REJECTED
    for _ in range(200):
        run.run(5)
        run.soc -= max(0.0, run.applied_w) * 5 / HOUR / POLICY.usable_capacity_wh * 100
        assert run.soc > 42.0 - 1e-9
    assert run.applied_w < 1.0  # the floor's envelope has ramped it down to almost nothing


# ---------------------------------------------------------------- what the price yields to


def test_an_aggregator_request_takes_precedence_and_the_price_resumes_after_it():
    run = Run(priced(owner()))
    run.feed(price())
    run.run(10)
    run.feed(discharge("agg", run.t, run.t, run.t + 30, target=3_000))
    run.run(5)
    assert run.c.serving_id == "agg" and run.applied_w == 3_000
    run.run(40)
    assert run.c.serving_id == "p1" and run.applied_w == POLICY.max_discharge_w
    assert run.ended("p1") is None  # it waited, it did not end


def test_a_price_published_during_a_request_waits_for_it():
    run = Run(priced(owner()))
    run.feed(discharge("agg", 0.0, 0.0, 60, target=2_000))
    run.feed(price(t=0.0))
    run.run(10)
    assert run.c.serving_id == "agg" and run.applied_w == 2_000


def test_turning_price_mode_off_or_raising_the_threshold_ends_the_event():
    for change in ({"price_threshold_per_kwh": None}, {"price_threshold_per_kwh": 0.9},
                   {"price_kind": PriceKind.PRICE}):
        run = Run(priced(owner()))
        run.feed(price())
        run.run(10)
        run.feed(replace(run.c.owner, received_at=run.t, **change))
        assert run.ended("p1").reason.startswith("owner's price settings")
        run.run(2)
        assert run.applied_w == 0 and run.c.mode is Mode.STANDBY


# ---------------------------------------------------------------- the daily budget


def test_the_budget_stops_discharge_mid_interval_at_the_budget():
    run = Run(priced(owner(budget_wh=100)))  # 100 Wh at 11.5 kW: about 31 s
    run.feed(price())
    run.run(120, dt=0.1)
    ended = run.ended("p1")
    assert ended is not None and ended.reason.startswith(BUDGET_SPENT_END)
    assert 99.0 <= run.final("p1").meter_wh <= 100.0 + 1e-6
    assert run.c.price_day_wh <= 100.0 + 1e-6
    assert run.applied_w == 0 and run.c.mode is Mode.STANDBY
    late = answer_of(run.feed(price("p2", start=run.t, end=run.t + HOUR, t=run.t)), "p2")
    assert late.reason is ReasonCode.BUDGET_SPENT and "maximum is 100 Wh" in late.detail


def test_energy_that_flowed_while_inverter_readings_failed_counts_toward_the_budget():
    """A link down mid-event: the inverter goes on at the last setpoint it heard (until its revert)
    and its meter counts it; the next good reading must bring that energy to the day's total, and
    while readings fail the budget already allows for it, so the daily maximum is not overrun."""
    run = Run(priced(owner(budget_wh=1_000)))
    run.feed(price())
    run.run(20)
    held_w = run.applied_w
    assert held_w > 0
    for _ in range(3):  # three polls fail; the inverter cannot be told anything else meanwhile
        run.meter_wh += held_w / HOUR
        run.t += 1.0
        run.feed(bms(run.t, run.soc), inverter(run.t, comms_ok=False, error="timeout"))
        assert budget_left_wh(run.c, run.t) <= 1_000 - run.meter_wh + 1e-6  # what may be out is allowed for
    run.run(1)  # readings come back
    assert run.c.price_day_wh == pytest.approx(run.meter_wh, abs=0.5)  # everything the meter counted


def test_the_owner_lowering_the_price_power_mid_event_holds_at_once():
    run = Run(priced(owner(price_power_w=6_000)))
    run.feed(price())
    run.run(20)
    assert run.applied_w == 6_000
    run.feed(replace(run.c.owner, received_at=run.t, price_power_w=2_500))
    assert run.applied_w == 2_500 and run.c.serving_id == "p1"  # the same event, at the new power
    run.feed(replace(run.c.owner, received_at=run.t, price_power_w=9_000))
    run.run(20)
    assert run.applied_w == 6_000  # a higher power is not what this interval was judged at


def test_readings_far_apart_do_not_count_energy_that_never_flowed():
    """Found by the stateful machine: power fell right after a reading and the next came seconds later.
    The average of the two readings' power over the gap is far more than flowed; the day's counter
    takes the meter's count, the integral no more than the commands allowed."""
    run = Run(priced(owner(budget_wh=1_000)))
    run.feed(price())
    run.run(20)
    held_w = run.applied_w
    assert held_w > 0
    run.t += 0.01  # the pack allows nothing more, just after the reading: 0 W, still serving the price
    run.feed(bms(run.t, run.soc, max_discharge_w=0))
    assert run.applied_w == 0 and run.c.serving_id == "p1"
    counted, metered = run.c.price_day_wh, run.meter_wh + held_w * 0.01 / HOUR
    run.t += 5.0
    run.feed(bms(run.t, run.soc, max_discharge_w=0), inverter(run.t, measured_w=0.0, tot_wh_inj=metered))
    assert run.c.price_day_wh - counted == pytest.approx(held_w * 0.01 / HOUR)  # not held_w / 2 for 5 s


def test_the_budget_is_shared_by_the_day_and_renewed_by_the_next():
    run = Run(priced(owner(budget_wh=200)))
    run.feed(price("p1", end=60))
    run.run(70)
    spent_first = run.c.price_day_wh
    assert 150 < spent_first < 200
    run.feed(price("p2", start=run.t, end=run.t + HOUR, t=run.t))
    run.run(60, dt=0.1)
    assert run.ended("p2").reason.startswith(BUDGET_SPENT_END)
    assert run.c.price_day_wh <= 200 + 1e-6
    run.feed(CalendarDay(run.t, "2026-12-03"))
    assert run.c.price_day_wh == 0
    reply = answer_of(run.feed(price("p3", start=run.t, end=run.t + HOUR, t=run.t)), "p3")
    assert reply.verdict is Verdict.ACCEPTED


def test_a_wall_clock_stepped_back_across_midnight_does_not_grant_the_day_again():
    run = Run(priced(owner(budget_wh=500)))
    run.feed(CalendarDay(0.0, "2026-12-03", spent_wh=500))
    run.feed(CalendarDay(run.t, "2026-12-02"))  # NTP steps the clock back before midnight
    assert run.c.price_day_wh == 500
    assert answer_of(run.feed(price()), "p1").reason is ReasonCode.BUDGET_SPENT
    run.feed(CalendarDay(run.t, "2026-12-03"))  # midnight again: the same date, not a new one
    assert run.c.price_day_wh == 500
    run.feed(CalendarDay(run.t, "2026-12-04"))
    assert run.c.price_day_wh == 0


def test_a_restart_does_not_grant_the_day_again():
    run = Run(priced(owner(budget_wh=500)))
    run.feed(CalendarDay(0.0, "2026-12-02", spent_wh=500))
    assert answer_of(run.feed(price()), "p1").reason is ReasonCode.BUDGET_SPENT
    assert budget_left_wh(run.c, run.t) == 0


def test_a_later_interval_is_not_refused_for_today_budget():
    run = Run(priced(owner(budget_wh=500)))
    run.feed(CalendarDay(0.0, "2026-12-02", spent_wh=500))
    assert answer_of(run.feed(price(start=20 * HOUR, end=21 * HOUR)), "p1").verdict is Verdict.ACCEPTED


def test_nonsense_owner_price_settings_are_read_safely():
    c = priced(OwnerSettings(40, 0.0, price_threshold_per_kwh=math.nan, price_max_wh_per_day=-5,
                             price_power_w=math.inf))
    assert not c.owner.price_mode and c.owner.price_power_w is None and c.owner.price_max_wh_per_day == 0


# ---------------------------------------------------------------- properties

ACTIONS = st.one_of(
    st.tuples(st.just("price"), st.sampled_from([0.1, 0.3, 0.5, 2.0]), st.floats(-30, 20), st.floats(10, 3 * HOUR),
              st.sampled_from([PriceKind.EXPORT_PRICE, PriceKind.EXPORT_PRICE, PriceKind.PRICE])),
    st.tuples(st.just("aggregator"), st.floats(500, 15_000), st.floats(5, 600)),
    st.tuples(st.just("owner"), st.sampled_from([None, 0.0, 0.3, 0.3, 1.0]), st.sampled_from([0.0, 2.0, 80.0, 80.0, 400.0]),
              st.none() | st.floats(100, 15_000)),
    st.tuples(st.just("day"),),
    st.tuples(st.just("run"), st.integers(1, 120), st.sampled_from([0.05, 0.1, 0.5, 1.0, 3.0])),
)


class PricedWorld:
    """A pack whose true SoC falls with what the inverter sends, a BMS that reports it a little low,
    an inverter that follows the setpoint (until its revert timer runs out) and a meter that counts
    exactly what it delivered."""

    def __init__(self, soc: float, reserve: float, ramp: float, horizon: float, dcl: float, rating: float):
        self.policy = replace(POLICY, reserve_pct=reserve, ramp_w_per_s=ramp, command_horizon_s=horizon)
        self.soc, self.dcl, self.rating = soc, dcl, rating
        self.t, self.meter_wh, self.applied_w, self.ids, self.day = 0.0, 0.0, 0.0, 0, 0
        self.c = Controller.start(self.policy, owner(threshold=0.3, budget_wh=80.0), 0.0)
        self.day_budget = self.c.owner.price_max_wh_per_day

    def readings(self):
        return (bms(self.t, max(0.0, self.soc - 0.05), soc_max_pct=min(100.0, self.soc + 0.05),
                    max_discharge_w=self.dcl),
                inverter(self.t, measured_w=self.applied_w, tot_wh_inj=self.meter_wh, w_max_rtg=self.rating,
                         w_discha_max_rtg=self.rating))

    def feed(self, *inputs) -> None:
        before = self.c.price_day_wh
        result = step(self.c, [*self.readings(), *inputs], self.t)
        self.c, self.applied_w = result.controller, result.command.setpoint_w
        for price_input in (i for i in inputs if isinstance(i, PriceInterval)):
            assert result.answer_for(price_input.id) is not None, "a price without an answer"
        self.day_budget = max(self.day_budget, self.c.owner.price_max_wh_per_day)
        if self.c.price_day_wh > before:
            assert self.c.price_day_wh <= self.day_budget * (1 + 1e-9) + 1e-6, "the daily budget was overrun"
        w = self.applied_w
        assert w <= min(self.dcl, self.rating, self.policy.max_discharge_w) + 1e-6, "above a power limit"
        serving = self.c.book.find(self.c.serving_id) if self.c.serving_id else None
        for ended in (e for e in result.events if isinstance(e, DispatchEnded) and e.request_id.startswith("p")):
            event(f"price event ended: {ended.reason.split(' (')[0].split(':')[0]}")
        if w > 0 and serving is not None and serving.price_driven:
            event("discharging for a price")
            assert serving.target_w >= w - 1e-6 and serving.price.price_per_kwh >= self.c.owner.price_threshold_per_kwh

    def run(self, seconds: float, dt: float) -> None:
        for _ in range(max(1, round(seconds / dt))):
            floor = self.c.floor_pct(self.t)
            above = self.soc >= floor
            running = min(dt, self.policy.command_horizon_s)  # unrefreshed, the inverter reverts to 0 W
            self.meter_wh += max(0.0, self.applied_w) * running / HOUR
            self.soc -= self.applied_w / 0.96 * running / HOUR / self.policy.usable_capacity_wh * 100
            self.applied_w = self.applied_w if dt <= self.policy.command_horizon_s else 0.0
            self.t += dt
            if above:
                assert self.soc >= floor - 1e-9, f"SoC {self.soc} crossed the floor {floor}"
            self.feed()

    def act(self, action) -> None:
        match action:
            case ("price", per_kwh, start, duration, kind):
                self.ids += 1
                self.feed(PriceInterval(f"p{self.ids}", "oadr3", "tou", kind, per_kwh, self.t + start,
                                        self.t + start + duration, self.t))
            case ("aggregator", power, duration):
                self.ids += 1
                self.feed(discharge(f"a{self.ids}", self.t, self.t, self.t + duration, target=power))
            case ("owner", threshold, budget, power):
                self.feed(replace(self.c.owner, received_at=self.t, price_threshold_per_kwh=threshold,
                                  price_max_wh_per_day=budget, price_power_w=power))
            case ("day",):
                self.day += 1
                self.day_budget = self.c.owner.price_max_wh_per_day
                self.feed(CalendarDay(self.t, (FIRST_DAY + timedelta(days=self.day)).isoformat()))
            case ("run", seconds, dt):
                self.run(seconds, dt)


def check_world(actions, above, reserve, ramp, horizon, dcl, rating) -> None:
    world = PricedWorld(min(100.0, reserve + 2 + above), reserve, ramp, horizon, dcl, rating)
    world.run(1, 0.1)
    for action in actions:
        world.act(action)
    world.run(30, 0.5)


WORLDS = given(actions=st.lists(ACTIONS, min_size=1, max_size=15), above=st.floats(-1, 1) | st.floats(0.5, 40), reserve=st.floats(10, 80),
       ramp=st.sampled_from([200.0, 2_000.0]), horizon=st.sampled_from([2.0, 10.0]),
       dcl=st.sampled_from([11_500.0, 3_000.0]), rating=st.sampled_from([11_500.0, 7_600.0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@WORLDS
def test_with_prices_the_reserve_the_limits_and_the_daily_budget_hold(**world):
    """Prices, aggregator requests, owner changes and new days in any order: the true SoC never
    crosses the floor, no limit is passed, every price is answered, the day's billed price energy
    stays within the budget (the fast tier's count; the slow tier explores many more)."""
    check_world(**world)


@pytest.mark.slow
@WORLDS
def test_with_prices_the_claims_hold_in_many_more_worlds(**world):
    """The same claims at the profile's count (200 in CI; HYPOTHESIS_PROFILE=long: 10,000)."""
    check_world(**world)


def test_a_price_refused_for_what_has_passed_is_weighed_again_when_published_again():
    c = step(Controller.start(POLICY, owner(), 0.0), [CalendarDay(0.0, "2026-12-02")], 0.0).controller
    run = Run(c)
    assert answer_of(run.feed(price()), "p1").reason is ReasonCode.NO_DATA  # the gateway is still starting
    run.run(2)
    assert answer_of(run.feed(price(t=run.t)), "p1").verdict is Verdict.ACCEPTED  # the VEN's next poll
    run.run(5)
    assert run.c.serving_id == "p1" and run.applied_w > 0
    run.feed(replace(run.c.owner, received_at=run.t, price_threshold_per_kwh=0.9))
    assert answer_of(run.feed(price("p2", start=run.t, end=run.t + HOUR, t=run.t)), "p2").reason is \
        ReasonCode.BELOW_THRESHOLD
    run.feed(replace(run.c.owner, received_at=run.t, price_threshold_per_kwh=0.4))  # the owner lowers it
    assert answer_of(run.feed(price("p2", start=run.t, end=run.t + HOUR, t=run.t)), "p2").verdict is \
        Verdict.ACCEPTED
    bad = answer_of(run.feed(price("bad", per_kwh=math.nan, t=run.t)), "bad")
    assert answer_of(run.feed(price("bad", per_kwh=math.nan, t=run.t)), "bad") == replace(bad, at=run.t)


def test_a_long_interval_is_judged_on_the_energy_the_budget_lets_out():
    """A day-long price with 10 kWh a day at most and 15 kWh above the floor: full power, not the
    15 kWh spread over 24 hours."""
    soc = 42.0 + 15_000 / (POLICY.usable_capacity_wh * 0.95) * 100
    run = Run(priced(owner(budget_wh=10_000), soc=soc))
    reply = answer_of(run.feed(price(end=24 * HOUR)), "p1")
    assert reply.verdict is Verdict.ACCEPTED, reply
    greedy = Run(priced(owner(budget_wh=20_000), soc=soc))
    capped = answer_of(greedy.feed(price(end=24 * HOUR)), "p1")
    assert capped.verdict is Verdict.CAPPED and "energy above the floor" in capped.detail


def test_price_mode_off_and_on_again_serves_a_price_published_again_and_keeps_a_later_one():
    run = Run(priced(owner()))
    run.feed(price(end=40))
    run.feed(price("later", start=45, end=HOUR))
    run.run(10)
    settings = run.c.owner
    run.feed(replace(settings, received_at=run.t, price_threshold_per_kwh=None))
    assert run.ended("p1") is not None and run.ended("later") is None  # only the one in force ends
    run.run(2)
    run.feed(replace(settings, received_at=run.t))
    assert answer_of(run.feed(price(end=40, t=run.t)), "p1").verdict is Verdict.ACCEPTED  # the VEN's next poll
    run.run(5)
    assert run.c.serving_id == "p1" and run.applied_w > 0
    run.run(30)
    assert run.c.serving_id == "later" and run.applied_w > 0


def test_both_kinds_published_for_one_interval_under_one_id_serve_the_one_followed():
    """OpenADR 3 may carry PRICE and EXPORT_PRICE in one interval; the VEN names both by the interval."""
    for first, second in ((PriceKind.PRICE, PriceKind.EXPORT_PRICE), (PriceKind.EXPORT_PRICE, PriceKind.PRICE)):
        run = Run(priced(owner()))
        answers = {kind: answer_of(run.feed(price(kind=kind, per_kwh=0.5)), "p1") for kind in (first, second)}
        assert answers[PriceKind.EXPORT_PRICE].verdict is Verdict.ACCEPTED
        assert answers[PriceKind.PRICE].reason is ReasonCode.PRICE_KIND
        run.run(5)
        assert run.c.serving_id == "p1" and run.applied_w > 0
        again = answer_of(run.feed(price(kind=PriceKind.EXPORT_PRICE, per_kwh=0.5, t=run.t)), "p1")
        assert again.verdict is Verdict.ACCEPTED  # the followed one again: its answer, not a DUPLICATE


def test_the_journal_reading_keeps_a_price_event_open_beside_the_other_kind():
    from firmware_py.core.energy import still_open
    export = price(kind=PriceKind.EXPORT_PRICE, per_kwh=0.5)
    other = price(kind=PriceKind.PRICE, per_kwh=0.2)
    records = [export, DispatchAnswer.accepted("p1", 0.0), other,
               DispatchAnswer.refused("p1", 0.0, ReasonCode.PRICE_KIND, "the owner's threshold is for EXPORT_PRICE")]
    opened = still_open(records)
    assert list(opened) == ["p1"] and opened["p1"].request == export


def test_a_price_on_a_site_that_may_not_discharge_is_refused_not_a_crash():
    """`max_discharge_w = 0` (a charge-only site) and no price power of the owner's: 0 W to run at."""
    c = ready(0.0, policy=replace(POLICY, max_discharge_w=0.0))
    c = step(c, [owner(), CalendarDay(0.0, "2026-12-02")], 0.0).controller
    result = step(c, [bms(0.1), inverter(0.1), price(t=0.1)], 0.1)
    reply = answer_of(result, "p1")
    assert reply.verdict is Verdict.REJECTED and reply.reason is ReasonCode.INSUFFICIENT_ENERGY
    assert result.command.setpoint_w == 0


def test_a_price_its_program_withdrew_and_lists_again_unchanged_in_its_interval_is_served_again():
    """A listing that lacked the event once: the VEN cancelled its price, the next listing has it again at the
    same revision. Like a request in that case it is weighed anew and served, not refused as ended."""
    run = Run(priced(owner()))
    p = price("ev#0#EXPORT_PRICE", start=0.0, end=HOUR, t=0.0)
    assert answer_of(run.feed(p), p.id).verdict is Verdict.ACCEPTED
    run.run(30)
    assert run.c.mode is Mode.DISCHARGE
    run.feed(DispatchCancel(id=p.id, source=p.source, received_at=run.t, reason="the VTN no longer lists it"))
    run.run(5)
    assert run.c.mode is not Mode.DISCHARGE
    again = answer_of(run.feed(replace(p, received_at=run.t)), p.id)
    run.run(30)
    assert again.verdict is Verdict.ACCEPTED and run.c.mode is Mode.DISCHARGE and run.c.setpoint_w > 0
