"""Answering dispatch: exactly one answer per request, given on arrival, and what it sets in motion.

`answer` is the whole path a `DispatchRequest` takes: malformed -> INVALID;
an id already used -> the same answer again (idempotent) or DUPLICATE;
otherwise `judge` weighs it against a `Judgement` of the gateway at that
moment (refusals first: lockout, fault, journal, data, outage, the inverter's
enter-service delay; then the owner's opt-out; then the power limits, the site
limit among them, and for a request with a window the energy budget above the
floor; an open-ended request has no window to budget: it is followed until the
floor's envelope ends it). A new revision of a running event continues it (its
energy carries over), and an accepted STOP ends the source's other events but those that
outrank it (a better priority).
`cancel` is the one way a source ends its own event early.

`improvable` is how standing settings are served once what refused or capped
them has cleared: it names the requests in their window that a new revision
would get a better answer for now, and the source that holds the setting asks
again (the core never answers a request twice, nor revises a source's request
behind its back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from firmware_py.core import floor as floors
from firmware_py.core.controller import Controller
from firmware_py.core.energy import close_event, energy_record
from firmware_py.core.faults import bms_usable, inverter_usable
from firmware_py.core.floor import discharge_envelope_w, stopping_energy_wh
from firmware_py.core.requests import Booked, arrived, outranks
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchKind,
    DispatchRequest,
    Event,
    Mode,
    PriceInterval,
    ReasonCode,
    Verdict,
    is_finite_number,
    is_whole_number,
)

# Below this a "capped" discharge is not worth running: refuse it instead.
MIN_USEFUL_W = 100.0
# A capped request is asked again only for a cap this much higher (a share of the old cap, or
# MIN_USEFUL_W if more): SoC noise must not make a standing setting ask again every tick.
BETTER_CAP_SHARE = 0.05
# Refusals a new revision can never escape: the request itself is wrong.
FINAL_REFUSALS = frozenset({ReasonCode.INVALID, ReasonCode.DUPLICATE, ReasonCode.EXPIRED})


@dataclass(frozen=True)
class Judgement:
    """What the gateway can promise now: why it cannot serve at all, or the limits it serves within."""

    now: float
    refusal: ReasonCode | None  # LOCKOUT, FAULT, JOURNAL, NO_DATA, OUTAGE: the gateway cannot serve at all
    refusal_detail: str
    opted_out: bool
    energy_above_floor_wh: float  # above the highest floor in the request's window (open-ended: now)
    discharge_limit_w: float
    charge_limit_w: float
    charge_headroom_wh: float
    ramp_w_per_s: float
    discharge_limit_name: str = "power limit"  # which limit `discharge_limit_w` is, for the answer's detail
    charge_limit_name: str = "charge limit"
    envelope_w: float = 0.0  # what the floor's envelope allows now: an open-ended request's test
    storm_watch_pct: float | None = None  # the storm watch's SoC when it alone sets the window's floor

    @classmethod
    def refused(cls, now: float, code: ReasonCode, detail: str, ramp_w_per_s: float) -> "Judgement":
        """The gateway cannot serve anything now: every request but a STOP gets `code`."""
        return cls(now=now, refusal=code, refusal_detail=detail, opted_out=False, energy_above_floor_wh=0.0,
                   discharge_limit_w=0.0, charge_limit_w=0.0, charge_headroom_wh=0.0, ramp_w_per_s=ramp_w_per_s)


def judgement(c: Controller, req: DispatchRequest, now: float) -> Judgement:
    """The gateway as a request finds it: a refusal, or the limits over the request's window.

    A request with a window is judged on the highest floor in it (a departure inside
    it included); an open-ended one on the floor now, which the clamp follows as it moves.
    """
    refused = refusal(c, now)
    if refused is not None:
        return Judgement.refused(now, *refused, c.policy.ramp_w_per_s)
    policy, bms, inv = c.policy, c.bms, c.inverter
    start = max(now, req.start)
    checkpoints = [start]
    if not req.is_open_ended:
        checkpoints.append(req.end)
        if c.owner.departure_at is not None and start <= c.owner.departure_at <= req.end:
            checkpoints.append(c.owner.departure_at)
    floor = max(floors.floor_pct(policy, c.owner, t) for t in checkpoints)
    storm_binds = any(floors.storm_watch_binds(policy, c.owner, t) and floors.floor_pct(policy, c.owner, t) == floor
                      for t in checkpoints)
    soc_max = bms.believed("soc_max_pct")
    soc_max = soc_max if soc_max is not None else bms.soc_min_pct
    energy = floors.energy_above_wh(policy, bms.soc_min_pct, floor)
    rating_w = inv.discharge_rating_w()
    discharge_name, discharge_w = _lowest(
        ("site limit", c.site_limit_w(discharge=True)), ("BMS limit", bms.max_discharge_w),
        ("inverter rating", rating_w if math.isfinite(rating_w) else policy.max_discharge_w))
    charge_name, charge_w = _lowest(
        ("site limit", c.site_limit_w(discharge=False)), ("BMS charge limit", bms.max_charge_w),
        ("inverter charge rating", inv.charge_rating_w()))  # 0: the inverter says it cannot charge (`can_charge`)
    return Judgement(
        now=now, refusal=None, refusal_detail="",
        opted_out=c.owner.opted_out(start, req.id),
        energy_above_floor_wh=energy,
        discharge_limit_w=discharge_w, charge_limit_w=charge_w,
        charge_headroom_wh=max(0.0, (100 - soc_max) / 100 * policy.usable_capacity_wh),
        ramp_w_per_s=policy.ramp_w_per_s,
        discharge_limit_name=discharge_name, charge_limit_name=charge_name,
        envelope_w=discharge_envelope_w(policy, energy if c.mode is Mode.DISCHARGE else floors.energy_above_wh(
            policy, bms.soc_min_pct, floor + floors.ENTRY_HYSTERESIS_PCT)),
        storm_watch_pct=c.owner.storm_watch(start) if storm_binds else None,
    )


def _lowest(*limits: tuple[str, float]) -> tuple[str, float]:
    """The lowest of named limits (the first named on a tie), never below 0 W."""
    name, value = min(limits, key=lambda item: item[1])
    return name, max(0.0, value)


def refusal(c: Controller, now: float) -> tuple[ReasonCode, str] | None:
    """Why the gateway cannot take on any request now, most serious first (None: it can).

    The telemetry shows the same, so an interface can say why a standing setting is not
    followed at the moment, and the same answers clear when this does."""
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
    if c.inverter.enter_service_s > 0:
        return ReasonCode.ENTER_SERVICE, enter_service_detail(c.inverter.enter_service_s)
    return None


def enter_service_detail(remaining_s: float) -> str:
    """When export can resume, in words: the inverter's IEEE 1547 enter-service delay after a grid return."""
    return f"grid back: export may resume in {math.ceil(remaining_s):.0f} s (enter-service delay)"


def invalid_reason(req: DispatchRequest) -> str | None:
    """Why a request cannot mean anything, or None when it is well formed."""
    if not isinstance(req.id, str) or not req.id.strip():
        return "empty id"
    numbers = {"target_w": req.target_w, "start": req.start, "end": req.end}
    for name, value in numbers.items():
        if not is_finite_number(value) and not (name == "end" and value == math.inf):  # inf: open-ended
            return f"{name} is not a finite number: {value!r}"
    if not isinstance(req.kind, DispatchKind):
        return f"unknown kind {req.kind!r}"
    if req.kind is not DispatchKind.STOP and req.target_w <= 0:
        return f"target_w must be > 0 for {req.kind.value}, got {req.target_w}"
    if req.end <= req.start:
        return f"end {req.end} is not after start {req.start}"
    if req.ramp_w_per_s is not None and not (is_finite_number(req.ramp_w_per_s) and req.ramp_w_per_s > 0):
        return f"ramp_w_per_s must be > 0, got {req.ramp_w_per_s!r}"
    if req.priority is not None and not (is_whole_number(req.priority) and req.priority >= 0):
        return f"priority must be a whole number >= 0, got {req.priority!r}"
    return None


def invalid_revision(revision: object) -> str | None:
    """Why a revision cannot be ordered against another, or None. Asked before any other check, since a
    booked revision that is no count would break every later comparison of its id."""
    if is_whole_number(revision) and revision >= 0:
        return None
    return f"revision must be a whole number >= 0, got {revision!r}"


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
        return _capped(req, now, min(req.target_w, j.charge_limit_w), j.charge_limit_name,
                       j.charge_headroom_wh > 0)
    power = min(req.target_w, j.discharge_limit_w)
    if req.is_open_ended:  # no window to budget: followed to the floor, whose envelope ends it
        if min(power, j.envelope_w) < MIN_USEFUL_W <= power:
            if j.storm_watch_pct is not None:
                return _storm_watch(req, now, j.envelope_w, j)
            return DispatchAnswer.refused(req.id, now, ReasonCode.INSUFFICIENT_ENERGY,
                                          f"at most {j.envelope_w:.0f} W can be served now "
                                          f"(energy above the floor {j.energy_above_floor_wh:.0f} Wh)")
        return _capped(req, now, power, j.discharge_limit_name, True)
    duration_h = (req.end - max(req.start, now)) / 3600
    ramp = req.ramp_w_per_s or j.ramp_w_per_s
    budget = j.energy_above_floor_wh - stopping_energy_wh(power, ramp)
    if budget < power * duration_h:
        power = max(0.0, budget / duration_h)
        if j.storm_watch_pct is not None:
            return _storm_watch(req, now, power, j)
        return _capped(req, now, power, f"energy above the floor {j.energy_above_floor_wh:.0f} Wh", True)
    return _capped(req, now, power, j.discharge_limit_name, True)


def _storm_watch(req: DispatchRequest, now: float, power: float, j: Judgement) -> DispatchAnswer:
    """The storm watch's floor is what limits this request: refused with its own code when too little is
    left above it, else capped and saying so (the owner keeps that energy for an outage)."""
    floor = f"storm watch keeps {j.storm_watch_pct:g} % for an outage"
    if power < MIN_USEFUL_W:
        return DispatchAnswer.refused(req.id, now, ReasonCode.STORM_WATCH, f"{floor}; at most {power:.0f} W above it")
    return _capped(req, now, power, f"{floor} ({j.energy_above_floor_wh:.0f} Wh above it)", True)


def _capped(req: DispatchRequest, now: float, power: float, why: str, possible: bool) -> DispatchAnswer:
    if not possible or power < MIN_USEFUL_W:
        code = ReasonCode.INSUFFICIENT_ENERGY
        return DispatchAnswer.refused(req.id, now, code, f"at most {power:.0f} W can be served ({why})")
    if power < req.target_w:
        return DispatchAnswer.capped(req.id, now, round(power, 1), f"capped by {why}")
    return DispatchAnswer.accepted(req.id, now)


def answer(c: Controller, req: DispatchRequest, now: float) -> tuple[Controller, list[Event]]:
    """Answer `req` on arrival and book it; the events include the answer and any event it ends."""
    if (bad := invalid_revision(req.revision)) is not None:  # never booked: it is no revision of anything
        return c, [DispatchAnswer.refused(req.id, now, ReasonCode.INVALID, bad)]
    existing = c.book.find(req.id)
    if existing is not None and existing.price_driven:
        return c, [DispatchAnswer.refused(req.id, now, ReasonCode.DUPLICATE, "id already used by a published price")]
    if existing is not None and existing.request.source != req.source:  # one source cannot revise another's
        return c, [DispatchAnswer.refused(req.id, now, ReasonCode.DUPLICATE,
                                          f"id already used by {existing.request.source}")]
    if existing is not None and req.revision <= existing.request.revision and not _asked_again(existing, req, now):
        return c, [_repeat(existing, req, now)]  # a damaged copy is refused as such and ends nothing
    bad = invalid_reason(req)
    if bad is not None:
        reply = DispatchAnswer.refused(req.id, now, ReasonCode.INVALID, bad)
    else:
        reply = judge(req, judgement(c, req, now))
    c, events = revise(c, existing, req, reply, now)
    if req.kind is DispatchKind.STOP and reply.verdict is Verdict.ACCEPTED and req.start <= now:
        c, ended = apply_stop(c, req, now)  # a later one waits, booked, for its window (`machine._expire`)
        events += ended
    return c, events


def _asked_again(existing: Booked, req: DispatchRequest, now: float) -> bool:
    """The same request, cancelled by its source, sent again while its window is open: the source wants it
    after all (a VTN lists an event again that one listing lacked, and its VEN took for withdrawn), so it is
    judged anew, not answered with the answer of an event that no longer runs. A refusal it cancelled too
    (`cancel` marks it withdrawn and cancelled): its old answer may be a reason long passed (no data at
    start-up), and withdrawn, it would never be asked again for. One a STOP withdrew is not cancelled: it
    stays ended, as an event the STOP ended does."""
    return existing.cancelled and now < req.end and replace(req, received_at=existing.request.received_at) == \
        existing.request


def _repeat(existing: Booked, req: DispatchRequest, now: float) -> DispatchAnswer:
    """The same request again gets the answer it stands with; the same id with other content is refused."""
    if replace(req, received_at=existing.request.received_at) == existing.request:
        return standing(existing, now)
    return DispatchAnswer.refused(req.id, now, ReasonCode.DUPLICATE,
                                  f"id already used with other content (revision {existing.request.revision})")


def standing(entry: Booked, now: float) -> DispatchAnswer:
    """The answer a repeat of a booked request gets at `now`: its own answer while the event may still run.

    An accepted event that has ended is not accepted again by a repeat: a VEN would opt in to an
    event that no longer runs, and the journal would show it open again, to be closed at the next stop
    with an account of 0 Wh. A STOP holds nothing once applied: its repeat is accepted as it was.
    """
    rid = entry.request.id
    if not (entry.ended and entry.accepted) or entry.request.kind is DispatchKind.STOP:
        return replace(entry.answer, at=now)
    if entry.stopped_by_owner:
        return DispatchAnswer.refused(rid, now, ReasonCode.OPTED_OUT, "ended by the owner")
    if now >= entry.request.end:
        return DispatchAnswer.refused(rid, now, ReasonCode.EXPIRED, f"ended at {entry.request.end}, now {now}")
    return DispatchAnswer.refused(rid, now, ReasonCode.DUPLICATE, "this event has ended; a new revision starts it again")


def revise(c: Controller, existing: Booked | None, req: DispatchRequest, reply: DispatchAnswer,
           now: float, price: PriceInterval | None = None) -> tuple[Controller, list[Event]]:
    """Book the answered request (`price`: the published price it stands for). A new revision of an
    event continues it (energy and all) when it asks the kind the account counts (`Booked.account_kind`),
    also after a revision of it, of either kind, was refused; a refused or kind-changing revision ends the
    running one."""
    events: list[Event] = []
    rejected = reply.verdict is Verdict.REJECTED
    earlier = existing if existing is not None and existing.accepted else None
    if earlier is not None and not earlier.ended and (rejected or req.kind is not earlier.request.kind):
        change = "refused" if rejected else f"changed it to {req.kind.value}"
        c, events = close_event(c, earlier, now, f"revision {req.revision} {change}")
    held = _account(existing)
    if held is not None and rejected:
        # The book keeps the event's energy, under the revision and answer it ended with (a repeat of
        # that revision gets that answer, and a standing setting is asked again from it); a modification
        # refused came now all the same.
        entry = arrived(replace(held, request=req, answer=reply, ended=True, withdrawn=False, price=price,
                                arrived_at=None, counted=held.account_kind), held, now)
        return c.evolve(book=c.book.replace(entry)), events + [reply]
    entry = Booked(req, reply, ended=rejected, price=price)
    if held is not None and req.kind is held.account_kind is not DispatchKind.STOP:  # a STOP holds no energy
        entry = replace(entry, meter_wh=held.meter_wh, integrated_wh=held.integrated_wh,
                        commanded_integral_wh=held.commanded_integral_wh, last_report_at=held.last_report_at)
        if held.ended and not rejected:
            # An account closed and opened again carries its energy on: say so with the answer, since what a stop
            # or a restart reads from the journal starts the reopened event from its next energy record.
            return c.evolve(book=c.book.add(entry, now)), events + [reply, energy_record(c, entry, now)]
    return c.evolve(book=c.book.add(entry, now)), events + [reply]


def _account(existing: Booked | None) -> Booked | None:
    """The booked entry whose account a new revision continues: an accepted one, or one whose revision was
    refused after it delivered (the book keeps that energy under the refusal). Without the latter, an event
    served again once the refusal cleared (a standing setting's re-ask, a price back above the threshold)
    opened a new account at 0 Wh, and its last record, what statements bill, left out what it had delivered."""
    if existing is None:
        return None
    if existing.accepted or existing.meter_wh or existing.integrated_wh or existing.commanded_integral_wh:
        return existing
    return None


def apply_stop(c: Controller, stop: DispatchRequest, now: float) -> tuple[Controller, list[Event]]:
    """An accepted STOP, once its window has begun, ends every other live event of its source that
    had begun when it took effect and does not outrank it; the STOP itself holds nothing. One it would have
    ended that was refused for a reason that may pass is withdrawn: it is not asked again for.

    A priority is the source's own ranking of its requests (`in_force`): a STOP of priority 5 says
    nothing of an event of priority 1 of its source, which would be in force over it, so that one
    stands. Requests without a priority (SunSpec's, an event of none) never outrank a STOP.

    Applied when its window opens, not when it is answered: an OpenADR event's interval of level 0
    hours ahead stops what runs then, not the event running now nor its own earlier intervals. An
    event that begins later is a later instruction, and stands, even where the step that applies
    the STOP comes a tick after both began. A STOP answered after its window began takes effect
    on arrival."""
    took_effect = max(stop.start, stop.received_at)
    events: list[Event] = []
    for entry in c.book.live:
        if _stopped_by(entry, stop, took_effect):
            c, ended = close_event(c, entry, now, f"stopped by {stop.id}")
            events += ended
    for entry in c.book.entries:
        if _spared_refusal(entry, now) and _stopped_by(entry, stop, took_effect):
            c = c.evolve(book=c.book.replace(replace(entry, withdrawn=True)))
    return c.evolve(book=c.book.end(stop.id)), events


def _stopped_by(entry: Booked, stop: DispatchRequest, took_effect: float) -> bool:
    """Whether `stop` ends `entry`, had it run: of its source, begun when the STOP took effect, not outranking it."""
    return entry.request.source == stop.source and entry.request.id != stop.id and \
        entry.request.start <= took_effect and not outranks(entry.request, stop)


def _spared_refusal(entry: Booked, now: float) -> bool:
    """A request not running now that would be served once what held it back passes (`improvable`): refused
    for a passing reason (a fault, an outage), or ended by the owner's opt-out. A STOP withdraws it, as it ends
    the same request running: else, once the reason passed, its source asked again and it was served inside
    the STOP's window. Withdrawn, not cancelled: sent again unchanged, it keeps its answer (`_asked_again`)."""
    if entry.withdrawn or entry.price_driven or entry.request.kind is DispatchKind.STOP or now >= entry.request.end:
        return False
    if entry.accepted and not entry.ended:
        return False  # running: the STOP ends it
    answered = standing(entry, now)
    return answered.verdict is Verdict.REJECTED and answered.reason not in FINAL_REFUSALS


def cancel(c: Controller, item: DispatchCancel, now: float) -> tuple[Controller, list[Event]]:
    """End an accepted, live event early; one source cannot end another's event.

    A refused request that is cancelled is withdrawn, so it is never asked again for (`improvable`), unless
    its source sends it again unchanged in its window (`_asked_again`)."""
    entry = c.book.find(item.id)
    if entry is None or entry.withdrawn or (entry.ended and entry.accepted) or entry.request.source != item.source:
        return c, []
    if not entry.accepted:
        return c.evolve(book=c.book.replace(replace(entry, withdrawn=True, cancelled=True))), []
    why = f"cancelled by {item.source}" + (f": {item.reason}" if item.reason else "")
    c, ended = close_event(c, entry, now, why)
    return c.evolve(book=c.book.replace(replace(c.book.find(item.id), cancelled=True))), ended


# ---------------------------------------------------------------- standing settings


def improvable(c: Controller, now: float) -> frozenset[str]:
    """Requests in their window, refused or capped, that a new revision would get a better answer for now.

    The reason they were refused or capped has cleared (the gateway became ready, a fault
    cleared, the grid came back, the owner revoked an opt-out, an installer reset the
    lockout, a limit rose). Only the request's own source can ask again; this says when.
    """
    found = []
    for entry in c.book.entries:
        request = entry.request
        if not request.start <= now < request.end or request.kind is DispatchKind.STOP or entry.price_driven \
                or entry.withdrawn:
            continue  # a price is no source's standing setting: nobody would ask again
        answered = standing(entry, now)  # an event that ended stands refused: for good, unless by the owner's opt-out
        if answered.verdict is Verdict.ACCEPTED or answered.reason in FINAL_REFUSALS:
            continue  # served in full, or refused for good
        again = replace(request, revision=request.revision + 1, received_at=now)
        if better(judge(again, judgement(c, again, now)), answered):
            found.append(request.id)
    return frozenset(found)


def better(new: DispatchAnswer, old: DispatchAnswer) -> bool:
    """Whether `new` serves more than `old`: a refusal lifted, or a cap raised by a margin."""
    if new.verdict is Verdict.REJECTED or old.verdict is Verdict.ACCEPTED:
        return False
    if old.verdict is Verdict.REJECTED or new.verdict is Verdict.ACCEPTED:
        return True
    old_cap, new_cap = old.cap_w or 0.0, new.cap_w or 0.0
    return new_cap >= old_cap + max(MIN_USEFUL_W, BETTER_CAP_SHARE * old_cap)
