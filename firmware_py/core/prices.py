"""Price-responsive mode: published prices weighed against the owner's threshold and daily budget.

A `PriceInterval` is a fact, not a request, but once it meets the owner's wishes
it is served exactly like one: it is booked as a discharge request of its own
(its id, its source, its window, the owner's price power), so the one arbiter,
the floor, departure, storm watch, opt-out, faults, site limits and the clamp
govern it unchanged, and its energy is accounted per event like any other. An
aggregator's request in its window takes precedence (`RequestBook.in_force`): the
price event waits, and resumes when the request ends.

What is the price's own:
- `answer_price`: the one answer per interval, given on arrival (EXPIRED, then the
  owner's settings: PRICE_MODE_OFF, PRICE_KIND_NOT_FOLLOWED, BELOW_THRESHOLD; then,
  for an interval already in force, DAILY_BUDGET_SPENT; then every refusal and cap
  a request of that power and window would get). The same interval again gets the
  same answer, except after a refusal for what may pass (no data, a fault, the
  owner's settings, the budget): published again, it is weighed again as things are;
- `follow`: each step, ends a price event in its window that the owner's settings no
  longer allow (the mode turned off, the threshold raised above its price, the other
  kind chosen) or whose day's budget is spent;
- `budget_power_w`: the most power the budget left allows, the floor's envelope
  applied to the budget (ramping down from P at r uses P²/2r, and a setpoint may
  run unrefreshed for the inverter's revert time). Energy since the inverter's last
  reading is counted as if the highest setpoint since then had run (for at most the
  inverter timeout plus the revert time: by then the clamp has commanded 0 W and the
  inverter has reverted). So the billed (meter) energy stops at the budget: the count
  can pass it only by the meter's resolution (1 Wh), or by energy the inverter
  delivers above its setpoint;
- `new_day`: the budget counts per calendar date, which the runtime gives (`CalendarDay`).
"""

from __future__ import annotations

import math
from dataclasses import replace

from firmware_py.core.answers import FINAL_REFUSALS, MIN_USEFUL_W, invalid_revision, judge, judgement, revise, standing
from firmware_py.core.controller import Controller
from firmware_py.core.energy import close_event
from firmware_py.core.floor import discharge_envelope_w
from firmware_py.core.requests import Booked
from firmware_py.core.types import (
    CalendarDay,
    DispatchAnswer,
    DispatchKind,
    DispatchRequest,
    Event,
    OwnerSettings,
    PriceInterval,
    PriceKind,
    ReasonCode,
    Verdict,
    is_finite_number,
)

BUDGET_SPENT_END = "daily price budget spent"
SETTINGS_END = "owner's price settings"
MAX_PRICE_PER_KWH = 1_000_000.0
"""The largest price per kWh (either sign) taken as meant: far above any tariff in any currency, yet
small enough that every amount a statement prices with it fits the decimal arithmetic money is
rounded in. A larger published figure is a fault of the publisher, refused like any malformed one."""


def invalid_price(p: PriceInterval) -> str | None:
    """Why an interval cannot mean anything, or None when it is well formed."""
    if not isinstance(p.id, str) or not p.id.strip():
        return "empty id"
    if not isinstance(p.kind, PriceKind):
        return f"unknown price kind {p.kind!r}"
    for name in ("price_per_kwh", "start", "end"):
        value = getattr(p, name)
        if not is_finite_number(value):
            return f"{name} is not a finite number: {value!r}"
    if abs(p.price_per_kwh) > MAX_PRICE_PER_KWH:
        return f"price_per_kwh {p.price_per_kwh:g} is beyond {MAX_PRICE_PER_KWH:g} per kWh either way"
    if p.end <= p.start:
        return f"end {p.end} is not after start {p.start}"
    return None


def request_for(p: PriceInterval, owner: OwnerSettings, max_discharge_w: float) -> DispatchRequest:
    """The discharge request a qualifying interval is served as: the owner's price power over its window."""
    power = owner.price_power_w if owner.price_power_w is not None else max_discharge_w
    return DispatchRequest(p.id, p.source, DispatchKind.DISCHARGE, power, p.start, p.end, p.received_at,
                           revision=p.revision)


def owner_power_w(owner: OwnerSettings) -> float:
    """The most a price event may discharge at under the owner's settings as they are now: a power
    lowered mid-event holds at once (a higher one waits for the next interval, judged at that power)."""
    return owner.price_power_w if owner.price_power_w is not None else math.inf


def objection(owner: OwnerSettings, p: PriceInterval) -> tuple[ReasonCode, str] | None:
    """Why the owner's settings do not want discharge at this price, or None when they do."""
    if not owner.price_mode:
        return ReasonCode.PRICE_MODE_OFF, "price-responsive mode is off (no threshold or no daily energy set)"
    if p.kind is not owner.price_kind:
        return ReasonCode.PRICE_KIND, f"the owner's threshold is for {owner.price_kind.value}, not {p.kind.value}"
    if p.price_per_kwh < owner.price_threshold_per_kwh:
        return ReasonCode.BELOW_THRESHOLD, (f"price {p.price_per_kwh:g} per kWh is below the owner's threshold "
                                            f"{owner.price_threshold_per_kwh:g}")
    return None


def unread_wh(c: Controller, now: float) -> float:
    """Energy that may have gone out since the inverter's last good reading, not yet on its meter."""
    if c.metered is None:
        return 0.0
    age = max(0.0, now - c.metered.received_at)
    return c.peak_since_inverter_w * min(age, c.policy.inverter_timeout_s + c.policy.command_horizon_s) / 3600


def budget_left_wh(c: Controller, now: float) -> float:
    """The day's price-driven energy not yet spent, less what may be out but not yet read."""
    return c.owner.price_max_wh_per_day - c.price_day_wh - unread_wh(c, now)


def budget_power_w(c: Controller, now: float) -> float:
    """The most power the budget left allows: stopping from it at the ramp rate, or running it
    unrefreshed for the revert time, still ends within the budget."""
    return discharge_envelope_w(c.policy, budget_left_wh(c, now))


def spent(c: Controller, now: float) -> bool:
    """Too little of the day's budget is left to be worth discharging for."""
    return budget_power_w(c, now) < MIN_USEFUL_W


def judge_price(c: Controller, p: PriceInterval, req: DispatchRequest, now: float) -> DispatchAnswer:
    """The answer for a new, well-formed interval (its request `req`)."""
    if p.end <= now:
        return DispatchAnswer.refused(p.id, now, ReasonCode.EXPIRED, f"ended at {p.end}, now {now}")
    objected = objection(c.owner, p)
    if objected is not None:
        return DispatchAnswer.refused(p.id, now, *objected)
    if p.start <= now and spent(c, now):
        return DispatchAnswer.refused(p.id, now, ReasonCode.BUDGET_SPENT, _spent_detail(c))
    if req.target_w < MIN_USEFUL_W:  # the owner's price power (or, without one, the site's maximum) is ~0 W
        return DispatchAnswer.refused(p.id, now, ReasonCode.INSUFFICIENT_ENERGY,
                                      f"at most {req.target_w:.0f} W can be served (the price power)")
    budgeted = _as_far_as_the_budget_goes(c, req, now)
    reply = judge(budgeted, judgement(c, budgeted, now))
    if reply.verdict is Verdict.REJECTED:
        return reply
    left = max(0.0, budget_left_wh(c, now))
    why = (f"price {p.price_per_kwh:g} per kWh meets the threshold {c.owner.price_threshold_per_kwh:g}; "
           f"{left:.0f} Wh of the day's {c.owner.price_max_wh_per_day:.0f} Wh left")
    return replace(reply, detail=f"{reply.detail}; {why}" if reply.detail else why)


def _as_far_as_the_budget_goes(c: Controller, req: DispatchRequest, now: float) -> DispatchRequest:
    """`req` with its window cut to what the daily budget can run at its power, for judging the floor's
    energy: a long interval is not capped for energy the budget would never let out (today's budget
    left for an interval in force, a whole day's for a later one)."""
    start = max(req.start, now)
    energy = budget_left_wh(c, now) if req.start <= now else c.owner.price_max_wh_per_day
    end = start + max(1.0, max(0.0, energy) / req.target_w * 3600)
    return replace(req, end=min(req.end, end))


def _spent_detail(c: Controller) -> str:
    return (f"{c.price_day_wh:.0f} Wh of price-driven discharge today; "
            f"the owner's maximum is {c.owner.price_max_wh_per_day:.0f} Wh")


def answer_price(c: Controller, p: PriceInterval, now: float) -> tuple[Controller, list[Event]]:
    """Answer a published price on arrival and book it (as a request when it qualifies)."""
    if (bad := invalid_revision(p.revision)) is not None:  # never booked: it is no revision of anything
        return c, [DispatchAnswer.refused(p.id, now, ReasonCode.INVALID, bad)]
    existing = c.book.find(p.id)
    if existing is not None and existing.price is None:
        return c, [DispatchAnswer.refused(p.id, now, ReasonCode.DUPLICATE, "id already used by a dispatch request")]
    req = request_for(p, c.owner, c.policy.max_discharge_w)
    bad = invalid_price(p)
    if bad is None and p.kind is not c.owner.price_kind:
        # Not booked: a program may publish both kinds for one interval under one id, and the one
        # the owner follows must not be taken for a duplicate of the other.
        return c, [DispatchAnswer.refused(p.id, now, *objection(c.owner, p))]
    if bad is not None:
        reply = DispatchAnswer.refused(p.id, now, ReasonCode.INVALID, bad)
    elif existing is not None and existing.price.kind is p.kind and p.revision <= existing.price.revision \
            and not _judged_again(existing, p, now):
        return c, [_repeat(existing, p, now)]
    else:
        reply = judge_price(c, p, req, now)
    return revise(c, existing, req, reply, now, price=p)


def _judged_again(existing: Booked, p: PriceInterval, now: float) -> bool:
    """The same price published again after it was refused for what may have passed (no data yet, a
    fault, the owner's settings, the day's budget), after the owner's settings or opt-out ended it, or
    after its program withdrew it while its interval is still to run (a listing that lacked it once):
    a price is a fact, not a request that was turned down, so it is weighed again as things stand
    now (an event it ended continues, its energy carried on). Malformed, expired or clashing ids are not."""
    stopped = existing.stopped_by_owner or (existing.cancelled and now < p.end) or \
        (existing.answer.verdict is Verdict.REJECTED and existing.answer.reason not in FINAL_REFUSALS)
    return stopped and replace(p, received_at=existing.price.received_at) == existing.price


def _repeat(existing: Booked, p: PriceInterval, now: float) -> DispatchAnswer:
    """The same interval again gets the answer it stands with; the same id with other content is refused."""
    if replace(p, received_at=existing.price.received_at) == existing.price:
        return standing(existing, now)
    return DispatchAnswer.refused(p.id, now, ReasonCode.DUPLICATE,
                                  f"id already used with other content (revision {existing.price.revision})")


def follow(c: Controller, now: float) -> tuple[Controller, list[Event]]:
    """End price events the owner's settings no longer want, or (in their window) the budget no longer allows."""
    events: list[Event] = []
    for entry in c.book.live:
        if entry.price is None or not entry.in_window(now):
            continue  # a later one is weighed when it begins: the settings may have changed back by then
        objected = objection(c.owner, entry.price)
        if objected is not None:
            why = f"{SETTINGS_END}: {objected[1]}"
        elif spent(c, now):
            why = f"{BUDGET_SPENT_END} ({_spent_detail(c)})"
        else:
            continue
        c, ended = close_event(c, entry, now, why)
        if objected is not None:  # published again once the owner wants it, it is weighed again
            c = c.evolve(book=c.book.replace(replace(c.book.find(entry.request.id), stopped_by_owner=True)))
        events += ended
    return c, events


def new_day(c: Controller, day: CalendarDay) -> Controller:
    """The runtime says which date it is: a later date starts a new budget (less what the journal
    says that date already spent, after a restart); the same date keeps the larger count. An earlier
    date (the wall clock stepped back across midnight) starts nothing: what was spent stays counted
    against the later date, so no date's budget is granted twice (ISO dates sort as they fall)."""
    journaled = day.spent_wh if is_finite_number(day.spent_wh) and day.spent_wh > 0 else 0.0
    if c.day is not None and day.date > c.day:
        return c.evolve(day=day.date, price_day_wh=journaled)
    return c.evolve(day=max(day.date, c.day or day.date), price_day_wh=max(c.price_day_wh, journaled))


def settled_owner(owner: OwnerSettings) -> OwnerSettings:
    """The price settings as the core can use them: a threshold that is no number turns the mode off,
    a budget that is none is 0 Wh, a power that is none means as much as the limits allow."""
    threshold, budget, power = owner.price_threshold_per_kwh, owner.price_max_wh_per_day, owner.price_power_w
    kind = owner.price_kind if owner.price_kind in tuple(PriceKind) else PriceKind.EXPORT_PRICE
    return replace(owner, price_kind=PriceKind(kind),
                   price_threshold_per_kwh=threshold if threshold is None or is_finite_number(threshold) else None,
                   price_max_wh_per_day=budget if is_finite_number(budget) and budget > 0 else 0.0,
                   price_power_w=power if power is not None and is_finite_number(power) and power > 0 else None)
