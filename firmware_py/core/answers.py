"""Answering dispatch: exactly one answer per request, given on arrival, and what it sets in motion.

`answer` is the whole path a `DispatchRequest` takes: malformed -> INVALID;
an id already used -> the same answer again (idempotent) or DUPLICATE;
otherwise `judge` weighs it against a `Judgement` of the gateway at that
moment (refusals first: lockout, fault, journal, data, outage; then the owner's
opt-out; then the energy budget above the floor). A new revision of a running
event continues it (its energy carries over), and an accepted STOP ends the
source's other events. `cancel` is the one way a source ends its own event early.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from firmware_py.core import floor as floors
from firmware_py.core.controller import Controller
from firmware_py.core.energy import close_event
from firmware_py.core.faults import bms_usable, inverter_usable
from firmware_py.core.floor import stopping_energy_wh
from firmware_py.core.requests import Booked
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchKind,
    DispatchRequest,
    Event,
    ReasonCode,
    Verdict,
    is_finite_number,
)

# Below this a "capped" discharge is not worth running: refuse it instead.
MIN_USEFUL_W = 100.0


@dataclass(frozen=True)
class Judgement:
    """What the gateway can promise now: why it cannot serve at all, or the limits it serves within."""

    now: float
    refusal: ReasonCode | None  # LOCKOUT, FAULT, JOURNAL, NO_DATA, OUTAGE: the gateway cannot serve at all
    refusal_detail: str
    opted_out: bool
    energy_above_floor_wh: float  # above the highest floor in the request's window
    discharge_limit_w: float
    charge_limit_w: float
    charge_headroom_wh: float
    ramp_w_per_s: float

    @classmethod
    def refused(cls, now: float, code: ReasonCode, detail: str, ramp_w_per_s: float) -> "Judgement":
        """The gateway cannot serve anything now: every request but a STOP gets `code`."""
        return cls(now=now, refusal=code, refusal_detail=detail, opted_out=False, energy_above_floor_wh=0.0,
                   discharge_limit_w=0.0, charge_limit_w=0.0, charge_headroom_wh=0.0, ramp_w_per_s=ramp_w_per_s)


def judgement(c: Controller, req: DispatchRequest, now: float) -> Judgement:
    """The gateway as a request finds it: a refusal, or the limits over the request's window."""
    refused = _refusal(c, now)
    if refused is not None:
        return Judgement.refused(now, *refused, c.policy.ramp_w_per_s)
    policy, bms, inv = c.policy, c.bms, c.inverter
    start = max(now, req.start)
    checkpoints = [start, req.end]
    if c.owner.departure_at is not None and start <= c.owner.departure_at <= req.end:
        checkpoints.append(c.owner.departure_at)
    floor = max(floors.floor_pct(policy, c.owner, t) for t in checkpoints)
    soc_max = bms.soc_max_pct if bms.soc_max_pct is not None else bms.soc_min_pct
    return Judgement(
        now=now, refusal=None, refusal_detail="",
        opted_out=c.owner.opted_out(start, req.id),
        energy_above_floor_wh=floors.energy_above_wh(policy, bms.soc_min_pct, floor),
        discharge_limit_w=min(policy.max_discharge_w, bms.max_discharge_w,
                              inv.w_discha_max_rtg or inv.w_max_rtg or policy.max_discharge_w),
        charge_limit_w=min(policy.max_charge_w, bms.max_charge_w,
                           inv.w_cha_max_rtg or inv.w_max_rtg or policy.max_charge_w),
        charge_headroom_wh=max(0.0, (100 - soc_max) / 100 * policy.usable_capacity_wh),
        ramp_w_per_s=policy.ramp_w_per_s,
    )


def _refusal(c: Controller, now: float) -> tuple[ReasonCode, str] | None:
    """Why the gateway cannot take on any request now, most serious first."""
    if c.faults.locked_out:
        return ReasonCode.LOCKOUT, "locked out until an installer reset"
    if c.faults.latches:
        return ReasonCode.FAULT, "fault: " + ", ".join(c.faults.kinds)
    if c.journal_failing():
        return ReasonCode.JOURNAL, f"journal unavailable: {c.journal.detail}"
    if c.resyncing:
        return ReasonCode.NO_DATA, "resyncing after a gateway stall: waiting for fresh BMS and inverter data"
    if not bms_usable(c.bms, now, c.policy) or not inverter_usable(c.inverter, now, c.policy):
        return ReasonCode.NO_DATA, "no fresh BMS or inverter data"
    if c.inverter.grid_outage:
        return ReasonCode.OUTAGE, "grid outage: serving the home"
    return None


def invalid_reason(req: DispatchRequest) -> str | None:
    """Why a request cannot mean anything, or None when it is well formed."""
    if not isinstance(req.id, str) or not req.id.strip():
        return "empty id"
    numbers = {"target_w": req.target_w, "start": req.start, "end": req.end}
    for name, value in numbers.items():
        if not is_finite_number(value):
            return f"{name} is not a finite number: {value!r}"
    if not isinstance(req.kind, DispatchKind):
        return f"unknown kind {req.kind!r}"
    if req.kind is not DispatchKind.STOP and req.target_w <= 0:
        return f"target_w must be > 0 for {req.kind.value}, got {req.target_w}"
    if req.end <= req.start:
        return f"end {req.end} is not after start {req.start}"
    if req.ramp_w_per_s is not None and not (is_finite_number(req.ramp_w_per_s) and req.ramp_w_per_s > 0):
        return f"ramp_w_per_s must be > 0, got {req.ramp_w_per_s!r}"
    return None


def judge(req: DispatchRequest, j: Judgement) -> DispatchAnswer:
    """The answer for a new, well-formed, not yet seen request.

    A STOP is accepted even when the gateway cannot serve: it only takes energy away.
    """
    now = j.now
    if req.end <= now:
        return DispatchAnswer.refused(req.id, now, ReasonCode.EXPIRED, f"ended at {req.end}, now {now}")
    if req.kind is DispatchKind.STOP:
        return DispatchAnswer.accepted(req.id, now, detail="stop")
    if j.refusal is not None:
        return DispatchAnswer.refused(req.id, now, j.refusal, j.refusal_detail)
    if j.opted_out and req.kind is DispatchKind.DISCHARGE:
        return DispatchAnswer.refused(req.id, now, ReasonCode.OPTED_OUT, "the owner has opted out")
    if req.kind is DispatchKind.CHARGE:
        return _capped(req, now, min(req.target_w, j.charge_limit_w), "charge limit",
                       j.charge_headroom_wh > 0)
    duration_h = (req.end - max(req.start, now)) / 3600
    ramp = req.ramp_w_per_s or j.ramp_w_per_s
    power = min(req.target_w, j.discharge_limit_w)
    budget = j.energy_above_floor_wh - stopping_energy_wh(power, ramp)
    if budget < power * duration_h:
        power = max(0.0, budget / duration_h)
        return _capped(req, now, power, f"energy above the floor {j.energy_above_floor_wh:.0f} Wh", True)
    return _capped(req, now, power, "power limit", True)


def _capped(req: DispatchRequest, now: float, power: float, why: str, possible: bool) -> DispatchAnswer:
    if not possible or power < MIN_USEFUL_W:
        return DispatchAnswer.refused(req.id, now, ReasonCode.INSUFFICIENT_ENERGY,
                                      f"at most {power:.0f} W can be served ({why})")
    if power < req.target_w:
        return DispatchAnswer.capped(req.id, now, round(power, 1), f"capped by {why}")
    return DispatchAnswer.accepted(req.id, now)


def answer(c: Controller, req: DispatchRequest, now: float) -> tuple[Controller, list[Event]]:
    """Answer `req` on arrival and book it; the events include the answer and any event it ends."""
    existing = c.book.find(req.id)
    bad = invalid_reason(req)
    if bad is not None:
        reply = DispatchAnswer.refused(req.id, now, ReasonCode.INVALID, bad)
    elif existing is not None and req.revision <= existing.request.revision:
        return c, [_repeat(existing, req, now)]
    else:
        reply = judge(req, judgement(c, req, now))
    c, events = _revise(c, existing, req, reply, now)
    if req.kind is DispatchKind.STOP and reply.verdict is Verdict.ACCEPTED:
        c, ended = _stop_source(c, req, now)
        events += ended
    return c, events


def _repeat(existing: Booked, req: DispatchRequest, now: float) -> DispatchAnswer:
    """The same request again gets the same answer; the same id with other content is refused."""
    if replace(req, received_at=existing.request.received_at) == existing.request:
        return replace(existing.answer, at=now)
    return DispatchAnswer.refused(req.id, now, ReasonCode.DUPLICATE,
                                  f"id already used with other content (revision {existing.request.revision})")


def _revise(c: Controller, existing: Booked | None, req: DispatchRequest, reply: DispatchAnswer,
            now: float) -> tuple[Controller, list[Event]]:
    """Book the answered request. A new revision of an accepted event continues it (energy and
    all) when its kind is unchanged; a refused or kind-changing revision ends the running one."""
    events: list[Event] = []
    rejected = reply.verdict is Verdict.REJECTED
    earlier = existing if existing is not None and existing.accepted else None
    if earlier is not None and not earlier.ended and (rejected or req.kind is not earlier.request.kind):
        change = "refused" if rejected else f"changed it to {req.kind.value}"
        c, events = close_event(c, earlier, now, f"revision {req.revision} {change}")
    if earlier is not None and rejected:
        return c, events + [reply]  # the book keeps the event as it ran, energy and all
    entry = Booked(req, reply, ended=rejected)
    if earlier is not None and req.kind is earlier.request.kind:
        entry = replace(entry, meter_wh=earlier.meter_wh, integrated_wh=earlier.integrated_wh,
                        last_report_at=earlier.last_report_at)
    return c.evolve(book=c.book.add(entry)), events + [reply]


def _stop_source(c: Controller, stop: DispatchRequest, now: float) -> tuple[Controller, list[Event]]:
    """An accepted STOP ends every other live event of its source; the STOP itself holds nothing."""
    events: list[Event] = []
    for entry in c.book.live():
        if entry.request.source == stop.source and entry.request.id != stop.id:
            c, ended = close_event(c, entry, now, f"stopped by {stop.id}")
            events += ended
    return c.evolve(book=c.book.end(stop.id)), events


def cancel(c: Controller, item: DispatchCancel, now: float) -> tuple[Controller, list[Event]]:
    """End an accepted, live event early; one source cannot end another's event."""
    entry = c.book.find(item.id)
    if entry is None or not entry.accepted or entry.ended or entry.request.source != item.source:
        return c, []
    return close_event(c, entry, now, f"cancelled by {item.source}")
