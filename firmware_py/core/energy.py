"""Energy per dispatch event: what the meter bills, what measured power integrates, the final record.

The aggregator pays on the inverter's TotWhInj/TotWhAbs delta; the integral of
measured power is the cross-check that catches a meter that stalls or jumps
(a step the rating cannot explain is not billed: power stands in for it).
An event's account closes with one final `EventEnergy`, whether it ended in a
step (`close_event`) or was left open by a gateway that died
(`close_after_restart`, fed from the journal by the runtime).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from firmware_py.core.controller import Controller
from firmware_py.core.policy import Policy
from firmware_py.core.requests import Booked
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    Event,
    EventEnergy,
    InverterStatus,
    PriceInterval,
    ReasonCode,
    Verdict,
)


def account(c: Controller, new: InverterStatus, now: float) -> Controller:
    """Add the energy between the last two good inverter readings to the request being served.

    Readings that failed in between are passed over, not a reason to drop the interval: the
    meter counted what flowed while the link was down (until the inverter's own revert), and
    the owner's daily price budget must count it too. An interval either reading of which
    reports a grid outage is not the event's: some or all of it was the house's backup, which
    no event is billed (at most one poll of the event's own energy, before the outage, goes with it)."""
    prev, entry = c.metered, c.book.find(c.serving_id) if c.serving_id else None
    if entry is None and c.metered_serving:  # a lost link stopped the serving; the inverter went on for it
        entry = c.book.find(c.metered_serving)
        entry = None if entry is None or entry.ended else entry
    if entry is None or prev is None or not new.comms_ok or prev.grid_outage or new.grid_outage:
        return c  # the grid went down in the interval or was down: the pack served the house, never the event
    dt = new.received_at - prev.received_at
    if dt <= 0:
        return c
    discharge = entry.request.kind is DispatchKind.DISCHARGE
    power = (prev.measured_w + new.measured_w) / 2
    integrated = (max(0.0, power) if discharge else min(0.0, power)) * dt / 3600
    meter = (new.tot_wh_inj - prev.tot_wh_inj) if discharge else (prev.tot_wh_abs - new.tot_wh_abs)
    quiet, commanded = _quiet_s(c, new, dt), commanded_wh(c, now)
    if not meter_plausible(meter if discharge else -meter, new, quiet, c.policy) or \
            (discharge and quiet > dt and _beyond_commands(c, meter, commanded)):
        meter = integrated  # a meter that jumped or ran backwards is not billed; power stands in
    bounded = min(integrated, commanded - c.metered_commanded_wh) if discharge else integrated
    before = max(entry.meter_wh, entry.commanded_integral_wh)
    entry = replace(entry, meter_wh=entry.meter_wh + meter, integrated_wh=entry.integrated_wh + integrated,
                    commanded_integral_wh=entry.commanded_integral_wh + bounded)
    c = c.evolve(book=c.book.replace(entry))
    if entry.price_driven:
        # The owner's daily budget must not be overrun: it counts the larger of the meter's total and the
        # integral of measured power (a stalled meter counts nothing), each interval's integral no more
        # than the commands allowed, since two readings far apart overstate it when the power changed.
        grown = max(entry.meter_wh, entry.commanded_integral_wh) - before
        return c.evolve(price_day_wh=c.price_day_wh + max(0.0, grown))
    return c


def commanded_wh(c: Controller, now: float) -> float:
    """The most discharge energy the gateway's commands allowed up to `now`, all told.

    Each setpoint counts for as long as it stood, and never past its revert horizon: the
    inverter does not exceed a setpoint, and drops to 0 W when none refreshes it. Between two
    good readings it bounds the integral of measured power, which readings far apart overstate
    when the power changed between them (a price's budget counter must not run past energy that
    never flowed)."""
    standing = 0.0
    if c.last_step_at is not None:
        stood = min(max(0.0, now - c.last_step_at), c.policy.command_horizon_s)
        standing = max(0.0, c.setpoint_w) * stood / 3600
    return c.commanded_wh + standing


METER_QUIET_MAX_S = 900.0
"""The longest a meter may hold still and then step for what flowed meanwhile: a 100 Wh register at
400 W moves every 15 minutes."""
METER_COUNT_MAX_WH = 100.0
"""The coarsest meter count (SunSpec TotWh_SF 2). A discharge step after the meter held still is billed only
up to what the commands allowed since it last moved, plus one count: a meter idle for a quarter of an hour
whose first step in an event is 5 kWh counted something else (a glitch, another user), not the event."""


def _quiet_s(c: Controller, new: InverterStatus, dt: float) -> float:
    """The time the meter's step in `new` may stand for: since the reading at which it last moved (a
    coarse register, 10 or 100 Wh a count, steps after holding still), at least `dt`, at most
    `METER_QUIET_MAX_S`."""
    moved_at = c.meter_moved_at if c.meter_moved_at is not None else new.received_at - dt
    return max(dt, min(new.received_at - moved_at, METER_QUIET_MAX_S))


def _beyond_commands(c: Controller, meter_wh: float, commanded: float) -> bool:
    """Whether a discharge step after a quiet meter exceeds what the commands let flow since it last moved
    (`commanded`: `commanded_wh` now), plus a count. Not asked across a lost link: the inverter ran on at the
    setpoint it last heard, until its revert, whatever the gateway commanded meanwhile."""
    if c.inverter is not None and not c.inverter.comms_ok:
        return False
    return meter_wh > commanded - c.meter_moved_commanded_wh + METER_COUNT_MAX_WH


def meter_plausible(delta_wh: float, status: InverterStatus, dt: float, policy: Policy) -> bool:
    """A meter step is plausible when it is forward and no larger than twice the rating allows in `dt`."""
    rating = max(status.w_max_rtg, policy.max_discharge_w, policy.max_charge_w)
    return 0.0 <= delta_wh <= 2 * rating * dt / 3600 + 1.0


def energy_record(c: Controller, entry: Booked, now: float, final: bool = False) -> EventEnergy:
    """The event's energy so far, with the meter reading that lets a restart bill the gap after it."""
    total = c.inverter.tot_wh_inj if c.inverter is not None and c.inverter.comms_ok else None
    return EventEnergy(at=now, request_id=entry.request.id, meter_wh=round(entry.meter_wh, 3),
                       integrated_wh=round(entry.integrated_wh, 3), final=final, meter_total_wh=total)


def report_energy(c: Controller, now: float) -> tuple[Controller, list[Event]]:
    """Every `energy_report_interval_s`, the served event's energy so far (bounds what a crash can lose)."""
    entry = c.book.find(c.serving_id) if c.serving_id else None
    if entry is None or now - entry.last_report_at < c.policy.energy_report_interval_s:
        return c, []
    c = c.evolve(book=c.book.replace(replace(entry, last_report_at=now)))
    return c, [energy_record(c, entry, now)]


def release_energy(c: Controller, serving: str | None, backup: bool, now: float) -> tuple[Controller, list[Event]]:
    """The event served until now, still live, is not served from this step (`serving` is another request
    or none): its energy so far, at once. Only the event served last is reported periodically, and a restart
    bills the meter's gap to the event reported last, so without this record its energy since its last
    report would be billed to no one once another request ran. When it is served again, its next record
    comes at once, with the meter reading it bills from.

    The record carries the meter reading, except in an outage (`backup`: the pack serves the house, and
    the meter's gap after is the house's), and except with no successor while the inverter's link is
    lost: the inverter goes on for the event until its revert, so its last record with a reading stands
    (`account` adds what flowed, once the link is back)."""
    entry = c.book.find(c.serving_id) if c.serving_id and serving != c.serving_id else None
    if entry is None or entry.ended:
        return c, []
    record = energy_record(c, entry, now)
    if record.meter_total_wh is None and serving is None and not backup:
        return c, []
    c = c.evolve(book=c.book.replace(replace(entry, last_report_at=-math.inf)))
    return c, [replace(record, meter_total_wh=None) if backup else record]


def close_event(c: Controller, entry: Booked, now: float, why: str) -> tuple[Controller, list[Event]]:
    """End a booked request: it stops applying, and its account closes with a final record (a STOP
    waiting for its window, cancelled or revised, has no account: it holds nothing)."""
    c = c.evolve(book=c.book.replace(replace(entry, ended=True)))
    if entry.request.kind is DispatchKind.STOP:
        return c, [DispatchEnded(now, entry.request.id, why)]
    return c, [DispatchEnded(now, entry.request.id, why), energy_record(c, entry, now, final=True)]


def close_at_stop(c: Controller, open_ids: Iterable[str], meter_total_wh: float | None, now: float,
                  reason: str) -> tuple[Controller, list[Event]]:
    """End the events of `open_ids` (those the journal shows open) that this run's core still holds, at a
    clean stop: DispatchEnded and a final EventEnergy each, from the live account (the meter's and the
    integral's), not from the journal's last record, which may be up to a report interval old.

    The meter's gap between the core's last good reading and the stop's final one (`meter_total_wh`)
    goes to the event served last, only when it is forward and no more than a crash could leave
    unreported, and counted in its integral too (as `close_after_restart` bills it); every other event
    closes at its live account.
    A STOP holds nothing; an open event the core does not hold (left open by an earlier run) is not closed
    here: `close_after_restart` closes it.
    """
    served, wanted = c.serving_id or c.metered_serving, set(open_ids)
    events: list[Event] = []
    for entry in c.book.entries:
        if entry.request.id not in wanted or entry.ended or entry.request.kind is DispatchKind.STOP:
            continue
        c, closed = close_event(c, entry, now, reason)
        if entry.request.id == served:
            final = closed[-1]
            # from the last good reading, the one the live account reaches: with the link lost at the stop
            # the record carries no meter total, and the inverter ran on for the event meanwhile
            gap = _billable_gap(c.metered.tot_wh_inj if c.metered is not None else None, meter_total_wh, c.policy)
            closed[-1] = replace(final, meter_wh=round(final.meter_wh + gap, 3),
                                 integrated_wh=round(final.integrated_wh + gap, 3),  # no power read meanwhile
                                 meter_total_wh=meter_total_wh if meter_total_wh is not None else final.meter_total_wh)
        events.extend(closed)
    return c, events


# ---------------------------------------------------------------- after a restart


def delivered_wh(c: Controller) -> dict[str, float]:
    """Billed (meter) energy of each accepted discharge event the controller remembers, by request id
    (one whose last revision was refused keeps the energy it delivered before)."""
    return {e.request.id: e.meter_wh for e in c.book.entries
            if e.account_kind is DispatchKind.DISCHARGE and (e.accepted or e.meter_wh or e.integrated_wh)}


def most_unreported_wh(policy: Policy) -> float:
    """The most a crash can leave unreported: a report interval plus the revert time at full power.

    A meter gap larger than this cannot be the dead gateway's doing (someone else
    used the inverter, or it was replaced), so it is not billed to an event.
    """
    seconds = policy.energy_report_interval_s + policy.command_horizon_s + policy.inverter_timeout_s
    return policy.max_discharge_w * seconds / 3600


@dataclass(frozen=True)
class OpenEvent:
    """An accepted request with no end yet: what a restart needs to close it, and what a journal
    rotation carries into the next segment so that the restart need not read the older ones."""

    answer: DispatchAnswer
    request: DispatchRequest | PriceInterval | None = None  # a price-driven event: its published price
    last: EventEnergy | None = None


ASIDE = frozenset({ReasonCode.DUPLICATE, ReasonCode.PRICE_KIND})
"""Refusals that leave the event of their id as it was: a DUPLICATE restates it; a price of the kind the
owner does not follow may share its interval's id with the one followed (OpenADR 3 may publish both)."""


def still_open(events: Iterable[Event | DispatchRequest | PriceInterval]) -> dict[str, OpenEvent]:
    """Accepted requests with no end among `events` (decoded journal records, oldest first),
    each with its request (latest revision; for a price-driven event, its `PriceInterval`)
    and last energy record, when the records hold them.

    A refusal in `ASIDE` does not close the event of its id.
    Memory grows with the open events only: requests are forgotten once refused or ended.
    """
    requests: dict[str, DispatchRequest | PriceInterval] = {}
    accepted: dict[str, OpenEvent] = {}
    for event in events:
        if isinstance(event, PriceInterval) and event.id in accepted and \
                getattr(requests.get(event.id), "kind", event.kind) is not event.kind:
            continue  # the other kind of price of a running price event's interval
        if isinstance(event, (DispatchRequest, PriceInterval)):
            requests[event.id] = event
        elif isinstance(event, DispatchAnswer):
            before = accepted.get(event.request_id)
            if event.reason in ASIDE and before is not None:
                continue  # restates the answer in force, or answers another price of its interval: keep it
            if isinstance(requests.get(event.request_id), DispatchRequest) and \
                    requests[event.request_id].kind is DispatchKind.STOP:
                requests.pop(event.request_id)  # a STOP ends others and holds nothing itself: never open
            elif event.verdict is not Verdict.REJECTED:
                accepted[event.request_id] = OpenEvent(event, requests.get(event.request_id),
                                                       before.last if before else None)
            elif event.reason not in ASIDE:
                accepted.pop(event.request_id, None)
                requests.pop(event.request_id, None)
        elif isinstance(event, EventEnergy) and event.request_id in accepted:
            # Last in order once reported: of two records at the same instant (a handover's), the later is the
            # event served from then on, to which the meter's gap after them belongs (`close_after_restart`).
            accepted[event.request_id] = replace(accepted.pop(event.request_id), last=event)
        elif isinstance(event, DispatchEnded):
            ended = accepted.pop(event.request_id, None)
            if ended is None or requests.get(event.request_id) is ended.request:
                requests.pop(event.request_id, None)
            # else a revision that ended the event came before this end: its answer follows, and is read
            # as that revision's (a STOP's, holding nothing; a charge's, the event's next account)
    return accepted


def open_events(events: Iterable[Event | DispatchRequest | PriceInterval]) -> dict[str, EventEnergy | None]:
    """Accepted requests with no end among `events` (decoded journal records, oldest first),
    each with its last energy record (None when none was written)."""
    return {request_id: event.last for request_id, event in still_open(events).items()}


def close_after_restart(still_open: Mapping[str, EventEnergy | None], meter_total_wh: float | None,
                        policy: Policy, now: float, reason: str) -> list[Event]:
    """End every event a previous run left open: DispatchEnded and a final EventEnergy each.

    The meter's gap since the last report belongs to the event served last, the
    one reported most recently (of records at the same instant, as at a handover, the
    one journaled last: `still_open` keeps that order), and is billed to it only when it is forward and
    no more than a crash can leave unreported; every other event closes at its
    last reported energy. The billed gap is added to the integral too: no run integrated the power
    of a time no gateway saw, so the meter stands in for it (as power stands in for a meter step
    that cannot be billed), and the statement's cross-check compares what was both metered and
    integrated instead of calling the gap a meter that disagrees with power.
    """
    newest = max(reversed(list(still_open)), key=lambda rid: _reported_at(still_open[rid]), default=None)
    events: list[Event] = []
    for request_id, last in still_open.items():
        meter, integrated = (last.meter_wh, last.integrated_wh) if last else (0.0, 0.0)
        if request_id == newest:
            gap = _billable_gap(last.meter_total_wh if last else None, meter_total_wh, policy)
            meter, integrated = meter + gap, integrated + gap
        events.append(DispatchEnded(now, request_id, reason))
        events.append(EventEnergy(at=now, request_id=request_id, meter_wh=round(meter, 3),
                                  integrated_wh=round(integrated, 3), final=True, meter_total_wh=meter_total_wh))
    return events


def _reported_at(last: EventEnergy | None) -> float:
    return last.at if last else -1.0


def _billable_gap(since_wh: float | None, meter_total_wh: float | None, policy: Policy) -> float:
    """The meter's advance from `since_wh` (the total the account reaches) to `meter_total_wh`, when both
    are known, forward and no more than a crash can leave unreported; else 0."""
    if since_wh is None or meter_total_wh is None:
        return 0.0
    gap = meter_total_wh - since_wh
    return gap if 0 <= gap <= most_unreported_wh(policy) else 0.0
