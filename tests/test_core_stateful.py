"""Hypothesis drives the real core together with a simple pack and inverter model.

The model is the world: a pack whose true SoC falls with the energy the
inverter actually moves, a BMS that reports a conservative SoC (never above the
truth, as a BMS promises) with noise and jumps, power limits that fall, faults,
outages and lost data; an inverter that holds the last setpoint until its
revert timer runs out. The invariants are the safety claims of the gateway.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core_builders import bms, inverter
from firmware_py.core import Controller, Mode, Policy, step
from firmware_py.core import floor as floors
from firmware_py.core.faults import FRESHNESS_FAULTS, bms_usable, inverter_usable
from firmware_py.core.types import (
    BmsState,
    CalendarDay,
    ContactorState,
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    FaultCleared,
    FaultRaised,
    InstallerReset,
    InverterState,
    JournalHealth,
    OwnerSettings,
    PriceInterval,
    PriceKind,
    ReasonCode,
    ServingChanged,
    SiteLimit,
    Stall,
    Tick,
)

PACK_EFFICIENCY = 0.96  # AC out per DC in: better than the core's assumed 0.95
INJECTED = {"bms_fault", "over_temp", "inverter_fault"}

EXAMPLES = {"ci": 2_000, "long": 20_000, "dev": 200}.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), 2_000)
QUICK_EXAMPLES = 60


class GatewayWorld(RuleBasedStateMachine):
    @initialize(capacity=st.sampled_from([1_000.0, 5_000.0, 123_000.0]),
                above=st.floats(-3, 6) | st.floats(-100, 100), reserve=st.floats(0, 90),
                horizon=st.sampled_from([2.0, 10.0]), ramp=st.sampled_from([200.0, 2_000.0, 20_000.0]),
                price_budget=st.sampled_from([None, 1.0, 20.0, 300.0, 1e5]))
    def start(self, capacity, above, reserve, horizon, ramp, price_budget):
        """Start near the floor more often than not: that is where the reserve is tested."""
        soc = min(100.0, max(0.0, max(reserve, 10.0) + 2.0 + above))
        self.policy = Policy(usable_capacity_wh=capacity, reserve_pct=reserve, command_horizon_s=horizon,
                             ramp_w_per_s=ramp, fault_holdoff_s=3, lockout_faults=4, lockout_window_s=120)
        self.now = 0.0
        self.true_soc = soc
        owner = OwnerSettings(reserve, 0.0, price_threshold_per_kwh=None if price_budget is None else 0.25,
                              price_max_wh_per_day=price_budget or 0.0)  # price mode on from the start, often
        self.controller = Controller.start(self.policy, owner)
        self.applied_w = 0.0  # what the inverter is doing
        self.applied_at = 0.0  # when the gateway last commanded it
        self.dcl_w = 11_500.0
        self.bms_state, self.contactor = BmsState.SUPPORT, ContactorState.CLOSED
        self.bms_state_visible = True
        self.temp_c = 30.0
        self.outage = False
        self.entering_s = 0.0  # the inverter's enter-service delay left (after a grid return)
        self.inv_fault = False
        self.last_present = {kind: -math.inf for kind in INJECTED}
        self.ids: list[str] = []
        self.results = []
        self.meter_wh = 0.0  # the inverter's TotWhInj: every Wh it sent out, counted exactly
        self.prices: dict[str, PriceInterval] = {}
        self.day = 0
        self.day_budget_wh = owner.price_max_wh_per_day  # the highest daily price budget in force since the day began
        self.day_spent_wh = 0.0  # price-driven energy the core counted since the day began, however it counts

    # ---------------------------------------------------------------- the world

    @rule(dt=st.floats(0.01, 15))
    def advance(self, dt):
        """Time passes: the inverter moves energy at its setpoint until it reverts."""
        floor = self.world_floor_pct()
        was_above = self.true_soc >= floor
        live_for = max(0.0, self.applied_at + self.policy.command_horizon_s - self.now)
        running = min(dt, live_for)
        dc_w = self.applied_w / PACK_EFFICIENCY if self.applied_w > 0 else self.applied_w * PACK_EFFICIENCY
        self.true_soc = min(100.0, self.true_soc - dc_w * running / 3600 / self.policy.usable_capacity_wh * 100)
        self.meter_wh += max(0.0, self.applied_w) * running / 3600
        self.now += dt
        if was_above:
            assert self.true_soc >= floor - 1e-9, (
                f"true SoC {self.true_soc:.6f} crossed the floor {floor:.6f} at {self.applied_w:.1f} W")

    def world_floor_pct(self) -> float:
        """The floor as the world is. In a grid outage the house draws from the pack down to the backup
        floor, whether or not the gateway still hears of the outage: an inverter that falls silent in one
        holds its last setpoint (planned on the backup floor) until it reverts, while the gateway's own
        floor, no longer knowing of the outage, is the owner's reserve again."""
        c = self.controller
        return floors.floor_pct(c.policy, c.owner, self.now, c.outage(self.now) or self.outage)

    def feed(self, *inputs):
        before_wh = self.controller.price_day_wh
        result = step(self.controller, list(inputs), self.now)
        self.controller = result.controller
        self.check_prices(result, inputs, before_wh)
        self.applied_w, self.applied_at = result.command.setpoint_w, self.now
        self.results.append(result)
        event(f"mode {result.controller.mode.value}, {result.command.reason.split()[0]}")
        for answer in (e for e in result.events if isinstance(e, DispatchAnswer)):
            event(f"answer {answer.verdict.value} {answer.reason.value if answer.reason else ''}")
        self.check(result)

    @rule(noise=st.floats(0, 2), dcl_factor=st.sampled_from([1.0, 1.0, 0.5, 0.1, 0.0]),
          state=st.sampled_from([BmsState.SUPPORT] * 6 + [BmsState.FAULT, BmsState.DRIVE]),
          contactor=st.sampled_from([ContactorState.CLOSED] * 6 + [ContactorState.OPEN]),
          hot=st.booleans() | st.just(False), stale=st.sampled_from([(), (), ("soc_min_pct",), ("bms_state",)]))
    def bms_update(self, noise, dcl_factor, state, contactor, hot, stale):
        """The BMS reports: conservative SoC at most the truth, noisy and jumpy."""
        self.dcl_w = 11_500 * dcl_factor
        self.bms_state, self.contactor = state, contactor
        self.temp_c = 70.0 if hot else 30.0
        soc_min = max(0.0, self.true_soc - noise)
        self.bms_state_visible = "bms_state" not in stale
        self.note_conditions()
        self.feed(bms(self.now, soc_min, soc_max_pct=min(100.0, self.true_soc + noise),
                      max_discharge_w=self.dcl_w, max_charge_w=self.dcl_w, bms_state=state,
                      contactor_state=contactor, max_temp_c=self.temp_c, stale=frozenset(stale)))

    @rule(dt=st.floats(0.01, 0.4), noise=st.floats(0, 1), dcl_factor=st.sampled_from([1.0, 1.0, 1.0, 0.3]),
          steps=st.integers(1, 40))
    def healthy_run(self, dt, noise, dcl_factor, steps):
        """Normal life: both sources report on time, many times over, while energy flows."""
        for _ in range(steps):
            self.advance(dt)
            self.dcl_w = 11_500 * dcl_factor
            self.bms_state, self.contactor, self.temp_c = BmsState.SUPPORT, ContactorState.CLOSED, 30.0
            self.bms_state_visible, self.inv_fault = True, False
            self.note_conditions()
            self.feed(bms(self.now, max(0.0, self.true_soc - noise), soc_max_pct=min(100.0, self.true_soc + noise),
                          max_discharge_w=self.dcl_w, max_charge_w=self.dcl_w),
                      inverter(self.now, measured_w=self.applied_w, tot_wh_inj=self.meter_wh, grid_outage=self.outage,
                               grid_connected=not self.outage, enter_service_s=self.entering_s))

    @rule(power=st.floats(500, 20_000), duration=st.floats(10, 4 * 3600), dt=st.floats(0.01, 0.4),
          steps=st.integers(1, 60), noise=st.floats(0, 1))
    def discharge_now(self, power, duration, dt, steps, noise):
        """An aggregator event that starts now, then normal life while it runs."""
        self.ids.append(f"e{len(self.ids)}")
        self.feed(bms(self.now, max(0.0, self.true_soc - noise), soc_max_pct=min(100.0, self.true_soc + noise),
                      max_discharge_w=self.dcl_w, max_charge_w=self.dcl_w),
                  inverter(self.now, measured_w=self.applied_w, tot_wh_inj=self.meter_wh, grid_outage=self.outage,
                           grid_connected=not self.outage, enter_service_s=self.entering_s),
                  DispatchRequest(self.ids[-1], "agg", DispatchKind.DISCHARGE, power, self.now, self.now + duration,
                                  received_at=self.now))
        self.healthy_run(dt, noise, 1.0, steps)

    @rule(outage=st.booleans(), fault=st.booleans(), comms=st.sampled_from([True, True, True, False]),
          rating=st.sampled_from([11_500.0, 7_600.0]), ac=st.sampled_from([0.0, 11_500.0, 7_600.0, 5_000.0]),
          entering=st.sampled_from([0.0, 0.0, 0.0, 300.0]))
    def inverter_update(self, outage, fault, comms, rating, ac, entering):
        self.outage, self.inv_fault = outage, fault and comms
        self.entering_s = 0.0 if outage else entering
        self.note_conditions()
        self.feed(inverter(self.now, comms_ok=comms, error=None if comms else "timeout", grid_outage=outage,
                           grid_connected=not outage, measured_w=self.applied_w, tot_wh_inj=self.meter_wh,
                           w_max_rtg=ac,  # an AC rating below the storage rates, or none reported
                           w_discha_max_rtg=rating, w_cha_max_rtg=rating, enter_service_s=self.entering_s,
                           inv_state=InverterState.FAULT if fault else InverterState.RUNNING))

    @rule(limit=st.none() | st.floats(0, 15_000), source=st.sampled_from(["sunspec", "owner"]))
    def site_limit(self, limit, source):
        """A site controller (or another source) sets or lifts the site limit."""
        self.feed(SiteLimit(self.now, source, limit))

    @rule(kind=st.sampled_from([DispatchKind.DISCHARGE] * 4 + [DispatchKind.CHARGE, DispatchKind.STOP]),
          power=st.floats(500, 20_000) | st.floats(500, 20_000) | st.floats(-100, 100),
          start=st.floats(-10, 20), duration=st.floats(1, 4 * 3600) | st.floats(-5, 5) | st.just(math.inf),
          ramp=st.none() | st.none() | st.floats(0, 5_000), reuse=st.booleans(),
          priority=st.none() | st.integers(0, 3))
    def dispatch(self, kind, power, start, duration, ramp, reuse, priority):
        rid = self.ids[-1] if reuse and self.ids else f"e{len(self.ids)}"
        self.ids.append(rid)
        self.feed(DispatchRequest(rid, "agg", kind, power, self.now + start, self.now + start + duration,
                                  received_at=self.now, ramp_w_per_s=ramp, priority=priority))

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def cancel(self, data):
        self.feed(DispatchCancel(data.draw(st.sampled_from(self.ids)), "agg", self.now))

    @rule(reserve=st.floats(0, 100), opt_out=st.sampled_from([None, None, math.inf, 30.0]),
          departure=st.none() | st.floats(60, 7200), departure_soc=st.floats(0, 100))
    def owner(self, reserve, opt_out, departure, departure_soc):
        self.feed(OwnerSettings(reserve, self.now, opt_out_until=None if opt_out is None else self.now + opt_out,
                                departure_at=None if departure is None else self.now + departure,
                                departure_soc_pct=departure_soc))

    @rule(floor=st.floats(0, 100), offset=st.floats(-2, 3), duration=st.floats(1, 4 * 3600), near=st.booleans())
    def storm_watch_on(self, floor, offset, duration, near):
        """The owner (or an automation) raises the outage floor until a time, keeping every other wish:
        often just above the SoC, where stopping in time and charging toward it are tested."""
        if near:
            floor = min(100.0, max(0.0, self.true_soc + offset))
        owner = self.controller.owner
        self.feed(OwnerSettings(owner.reserve_pct, self.now, owner.opt_out_until, owner.opt_out_events,
                                owner.departure_at, owner.departure_soc_pct, storm_watch_floor_pct=floor,
                                storm_watch_until=self.now + duration))

    @rule()
    def storm_watch_off(self):
        """Revoked at any time, whatever the truck is doing."""
        owner = self.controller.owner
        self.feed(OwnerSettings(owner.reserve_pct, self.now, owner.opt_out_until, owner.opt_out_events,
                                owner.departure_at, owner.departure_soc_pct))

    @rule(threshold=st.none() | st.sampled_from([0.0, 0.25, 0.5]), budget=st.sampled_from([0.0, 1.0, 50.0, 500.0, 1e5]),
          power=st.none() | st.floats(0, 15_000), kind=st.sampled_from(list(PriceKind)))
    def price_settings(self, threshold, budget, power, kind):
        """The owner sets (or turns off) price-responsive mode, keeping every other wish."""
        self.feed(replace(self.controller.owner, received_at=self.now, price_threshold_per_kwh=threshold,
                          price_max_wh_per_day=budget, price_power_w=power, price_kind=kind))

    @rule(per_kwh=st.sampled_from([0.1, 0.25, 0.4, 0.9]), start=st.floats(-10, 20),
          duration=st.floats(60, 2 * 3600) | st.floats(1, 60) | st.floats(-5, 5),
          kind=st.sampled_from(list(PriceKind) + [PriceKind.EXPORT_PRICE]),
          reuse=st.booleans(), dt=st.floats(0.01, 0.4), steps=st.integers(1, 60), noise=st.floats(0, 1))
    def publish_price(self, per_kwh, start, duration, kind, reuse, dt, steps, noise):
        """A program publishes a price (a new interval, or a revision of the last), then normal life."""
        last = self.prices.get(f"p{len(self.prices) - 1}")
        pid = last.id if reuse and last is not None else f"p{len(self.prices)}"
        revision = last.revision + 1 if reuse and last is not None else 0
        self.prices[pid] = PriceInterval(pid, "oadr3", "tou", kind, per_kwh, self.now + start,
                                         self.now + start + duration, self.now, revision)
        self.feed(bms(self.now, max(0.0, self.true_soc - noise), soc_max_pct=min(100.0, self.true_soc + noise),
                      max_discharge_w=self.dcl_w, max_charge_w=self.dcl_w),
                  inverter(self.now, measured_w=self.applied_w, tot_wh_inj=self.meter_wh, grid_outage=self.outage,
                           grid_connected=not self.outage, enter_service_s=self.entering_s),
                  self.prices[pid])
        self.healthy_run(dt, noise, 1.0, steps)

    @rule(budget=st.sampled_from([1.0, 20.0, 300.0, 1e5]), power=st.none() | st.floats(500, 15_000),
          duration=st.floats(10, 2 * 3600), dt=st.floats(0.01, 0.4), steps=st.integers(1, 60),
          noise=st.floats(0, 1))
    def price_event_now(self, budget, power, duration, dt, steps, noise):
        """The owner's price mode on and a price above its threshold in force now, then normal life."""
        self.feed(replace(self.controller.owner, received_at=self.now, price_threshold_per_kwh=0.25,
                          price_max_wh_per_day=budget, price_power_w=power, price_kind=PriceKind.EXPORT_PRICE))
        self.publish_price(0.9, 0.0, duration, PriceKind.EXPORT_PRICE, False, dt, steps, noise)

    @rule()
    def next_day(self):
        """The runtime says the date changed: a new daily budget."""
        self.day += 1
        self.day_budget_wh = 0.0
        self.feed(CalendarDay(self.now, f"2026-12-{self.day + 1:02d}"))
        self.day_spent_wh = 0.0

    @precondition(lambda self: self.day > 0)
    @rule()
    def clock_stepped_back(self):
        """The wall clock stepped back across midnight (NTP): the runtime says yesterday's date again.
        Still the same day for the budget: what it counted stays counted."""
        self.feed(CalendarDay(self.now, f"2026-12-{self.day:02d}"))

    @rule(ok=st.sampled_from([True, True, False]))
    def journal(self, ok):
        """The runtime reports whether the journal took its last write."""
        self.feed(JournalHealth(self.now, ok, "" if ok else "disk I/O error"))

    @rule()
    def installer_reset(self):
        self.feed(InstallerReset(self.now))

    @rule()
    def tick(self):
        self.note_conditions()
        self.feed(Tick(self.now))

    @rule(gap=st.floats(0.3, 30))
    def stall(self, gap):
        """The gateway itself pauses (SIGSTOP): time passes unseen, then a step that says so."""
        self.advance(gap)
        self.note_conditions()
        self.feed(Stall(self.now, gap), Tick(self.now))

    def note_conditions(self):
        present = {"bms_fault": self.bms_state is BmsState.FAULT and self.bms_state_visible,
                   "over_temp": self.temp_c > 60,
                   "inverter_fault": self.inv_fault}
        for kind, on in present.items():
            if on:
                self.last_present[kind] = self.now

    # ---------------------------------------------------------------- the claims

    def check_prices(self, result, inputs, before_wh):
        """One answer per published price; price-driven discharge only as the owner's settings and
        the aggregator's precedence allow; the day's billed price energy within its budget."""
        c = result.controller
        for price in (i for i in inputs if isinstance(i, PriceInterval)):
            answered = result.answer_for(price.id)
            assert answered is not None, f"price {price.id} got no answer"
            event(f"price answered {answered.verdict.value} {answered.reason.value if answered.reason else ''}")
        self.day_budget_wh = max(self.day_budget_wh, c.owner.price_max_wh_per_day)
        self.day_spent_wh += max(0.0, c.price_day_wh - before_wh)
        if c.price_day_wh > before_wh:
            assert self.day_spent_wh <= self.day_budget_wh * (1 + 1e-9) + 1e-6, (
                f"{self.day_spent_wh:.6f} Wh of price-driven energy today, budget {self.day_budget_wh} Wh")
        for ended in (e for e in result.events if isinstance(e, DispatchEnded) and e.request_id in self.prices):
            event(f"price event ended: {ended.reason.split('(')[0].split(':')[0]}")
        serving = c.book.find(c.serving_id) if c.serving_id else None
        if serving is not None and serving.price_driven and result.command.setpoint_w > 0:
            event("discharging for a price")
            owner, price = c.owner, serving.price
            assert owner.price_mode and price.kind is owner.price_kind, "price discharge with the mode off"
            assert price.price_per_kwh >= owner.price_threshold_per_kwh, "price discharge below the threshold"
            assert all(e.price_driven for e in c.book.live if e.in_window(self.now)), \
                "price discharge while an aggregator's request is in its window"

    def check(self, result):
        c, w = result.controller, result.command.setpoint_w
        b, inv = c.bms, c.inverter
        if c.resyncing:
            assert w == 0, f"{w} W while resyncing after a stall"
            assert not [e for e in result.events if isinstance(e, FaultRaised) and e.kind in FRESHNESS_FAULTS], \
                "the gateway's own stall raised a freshness fault"
        if not bms_usable(b, self.now, self.policy) or not inverter_usable(inv, self.now, self.policy):
            assert w == 0, f"stale data but {w} W ({result.command.reason})"
            return
        if c.faults.latches or c.faults.locked_out:
            assert w == 0, f"fault latched but {w} W"
        if w > 0:
            assert w <= b.max_discharge_w + 1e-6, "above the BMS discharge limit"
            assert w <= self.policy.max_discharge_w + 1e-6, "above the site limit"
            assert w <= inv.w_discha_max_rtg + 1e-6, "above the inverter's discharge rating"
            assert w <= inv.w_max_rtg + 1e-6 or inv.w_max_rtg == 0, "above the inverter's AC rating"
            assert b.soc_min_pct > c.floor_pct(self.now), "discharging at or below the floor"
            assert b.energy_path_closed()
            if c.mode is Mode.DISCHARGE:
                assert w <= c.book.in_force(self.now).target_w + 1e-6, "above the request"
                assert not c.owner.opted_out(self.now, c.serving_id), "discharging while opted out"
            else:
                assert c.mode is Mode.BACKUP, f"discharging in {c.mode}"
        if w < 0:
            assert -w <= b.max_charge_w + 1e-6 and -w <= self.policy.max_charge_w + 1e-6
            assert -w <= inv.w_cha_max_rtg + 1e-6, "above the inverter's charge rating"
            assert -w <= inv.w_max_rtg + 1e-6 or inv.w_max_rtg == 0, "above the inverter's AC rating"
            assert c.mode is Mode.CHARGE, f"charging in {c.mode}"
            in_force = c.book.in_force(self.now)
            storm = c.owner.storm_watch(self.now)
            assert (in_force is not None and in_force.request.kind is DispatchKind.CHARGE) or (
                storm is not None and not c.outage(self.now) and b.soc_min_pct < storm), \
                "charging with neither a charge request nor a storm watch below its SoC"
        storm = c.owner.storm_watch(self.now)
        if storm is not None and w > 0 and c.mode is Mode.DISCHARGE:
            assert b.soc_min_pct > storm, "discharging at or below the storm watch's SoC"
        for answer in (e for e in result.events if isinstance(e, DispatchAnswer)):
            if answer.reason is ReasonCode.STORM_WATCH:
                assert storm is not None, "refused STORM_WATCH without a storm watch"
        if c.journal_failing():
            assert w == 0 or c.mode is Mode.BACKUP, f"{w} W in {c.mode} while the journal fails"
        if w != 0 and c.mode is not Mode.BACKUP:
            assert abs(w) <= c.site_limit_w(discharge=w > 0) + 1e-6, "above the site limit in force"
            assert inv.enter_service_s == 0, f"{w} W during the inverter's enter-service delay"
        for e in result.events:
            if isinstance(e, FaultCleared) and e.kind in INJECTED:
                assert self.now - self.last_present[e.kind] >= self.policy.fault_holdoff_s - 1e-9, \
                    f"{e.kind} cleared {self.now - self.last_present[e.kind]:.2f} s after it was last present"

    @invariant()
    def faults_stay_latched(self):
        """A fault raised stays in the latch book until the core says it cleared."""
        if not getattr(self, "results", None):
            return
        open_kinds: set[str] = set()
        for e in (e for r in self.results for e in r.events):
            if isinstance(e, FaultRaised):
                open_kinds.add(e.kind)
            elif isinstance(e, FaultCleared):
                open_kinds.discard(e.kind)
        assert open_kinds - {"lockout"} <= set(self.controller.faults.kinds)
        assert ("lockout" in open_kinds) == self.controller.faults.locked_out

    @invariant()
    def the_journal_hears_of_every_change_of_the_request_served(self):
        """A statement charges overlapping events by the `ServingChanged` records: one per change, none else."""
        if len(getattr(self, "results", ())) < 2:
            return
        before, after = self.results[-2].controller.serving_id, self.results[-1].controller.serving_id
        told = [e.request_id for e in self.results[-1].events if isinstance(e, ServingChanged)]
        assert told == ([after] if after != before else [])

    @invariant()
    def lockout_only_clears_by_reset(self):
        if not hasattr(self, "controller") or len(self.results) < 2:
            return
        before, after = self.results[-2].controller, self.results[-1].controller
        if before.mode is Mode.LOCKOUT and after.mode is not Mode.LOCKOUT:
            assert any(isinstance(e, FaultCleared) and e.kind == "lockout" for e in self.results[-1].events)


def machine_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.slow
class TestGatewayWorld(GatewayWorld.TestCase):
    """The CI count (2,000 runs of up to 40 steps; HYPOTHESIS_PROFILE=long: 20,000) in two halves,
    so the slow tier's two workers each explore one at once (each half draws its own runs)."""

    settings = machine_settings(EXAMPLES // 2)


@pytest.mark.slow
class TestGatewayWorldOtherHalf(GatewayWorld.TestCase):
    """The other half of the CI count (see TestGatewayWorld)."""

    settings = machine_settings(EXAMPLES - EXAMPLES // 2)


class TestGatewayWorldQuick(GatewayWorld.TestCase):
    """The same machine and invariants at a small count, so the fast tier still drives the core
    through faults, outages and dispatch; the CI count runs in TestGatewayWorld."""

    settings = machine_settings(QUICK_EXAMPLES)
