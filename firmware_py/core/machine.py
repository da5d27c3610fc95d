"""The controller: `step(controller, inputs, now) -> StepResult`, pure.

Shape of one step (h11-style, no I/O, time injected):
  1. absorb each input in order (a dispatch request is answered on arrival);
  2. end requests whose window closed or that the owner opted out of;
  3. update the fault latches from the conditions now present;
  4. settle the mode: walk TRANSITIONS (data, in priority order) until no rule
     fires, so a sudden change lands in the right mode in this very step;
  5. the mode's handler proposes a setpoint;
  6. one safety clamp, blind to the mode, cuts it to every limit.
The priority order safety > outage backup > owner > dispatch > idle lives in
the order of TRANSITIONS and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from firmware_py.core import floor as floors
from firmware_py.core.faults import FaultBook, bms_usable, conditions, inverter_usable
from firmware_py.core.policy import Policy
from firmware_py.core.requests import Booked, Judgement, RequestBook, invalid_reason, judge
from firmware_py.core.types import (
    BmsSnapshot,
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    Event,
    EventEnergy,
    Input,
    InstallerReset,
    InverterCommand,
    InverterStatus,
    OwnerSettings,
    ReasonCode,
    Transition,
    Verdict,
)

# Enter DISCHARGE only this far above the floor, so SoC noise at the floor
# cannot toggle the mode every frame.
ENTRY_HYSTERESIS_PCT = 0.5


class Mode(str, Enum):
    STARTUP = "STARTUP"
    STANDBY = "STANDBY"
    DISCHARGE = "DISCHARGE"
    CHARGE = "CHARGE"
    BACKUP = "BACKUP"
    FAULT = "FAULT"
    LOCKOUT = "LOCKOUT"


@dataclass(frozen=True)
class Controller:
    """Everything the core remembers between steps."""

    policy: Policy
    owner: OwnerSettings
    mode: Mode = Mode.STARTUP
    bms: BmsSnapshot | None = None
    inverter: InverterStatus | None = None
    bms_seen: bool = False
    inverter_seen: bool = False
    faults: FaultBook = field(default_factory=FaultBook)
    book: RequestBook = field(default_factory=RequestBook)
    setpoint_w: float = 0.0
    reason: str = "starting: waiting for BMS and inverter data"
    serving_id: str | None = None
    last_step_at: float | None = None
    peak_since_bms_w: float = 0.0  # highest discharge commanded since the newest BMS snapshot

    @classmethod
    def start(cls, policy: Policy, owner: OwnerSettings | None = None, now: float = 0.0) -> "Controller":
        return cls(policy, owner or OwnerSettings(reserve_pct=policy.reserve_pct, received_at=now))

    def outage(self, now: float) -> bool:
        return inverter_usable(self.inverter, now, self.policy) and self.inverter.grid_outage

    def floor_pct(self, now: float) -> float:
        return floors.floor_pct(self.policy, self.owner, now, self.outage(now))

    def available_wh(self, now: float) -> float:
        """Energy above the floor right now (0 without fresh BMS data)."""
        if not bms_usable(self.bms, now, self.policy):
            return 0.0
        return floors.energy_above_wh(self.policy, self.bms.soc_min_pct, self.floor_pct(now))


_CONTROLLER_FIELDS = frozenset(f.name for f in fields(Controller))


def _evolve(c: Controller, **changes: Any) -> Controller:
    """`dataclasses.replace(c, **changes)`, built without `replace`'s per-call cost.

    The core evolves its controller three to five times a step, and the bench
    steps it ~200,000 times a run: `replace` walks every field and the frozen
    `__init__` sets each through `object.__setattr__`, a third of a step. A
    Controller is exactly its fields (no `__post_init__`, no init-less or cached
    attributes), so copying them and applying the changes builds the same object.
    """
    if not _CONTROLLER_FIELDS.issuperset(changes):
        raise TypeError(f"Controller has no field {sorted(changes.keys() - _CONTROLLER_FIELDS)[0]!r}")
    new = object.__new__(Controller)
    new.__dict__.update(c.__dict__, **changes)
    return new


@dataclass(frozen=True)
class StepResult:
    controller: Controller
    command: InverterCommand
    events: list[Event]

    def answer_for(self, request_id: str) -> DispatchAnswer | None:
        return next((e for e in self.events if isinstance(e, DispatchAnswer) and e.request_id == request_id), None)


# ---------------------------------------------------------------- transitions


@dataclass(frozen=True)
class View:
    """What guards, handlers and the clamp may look at in one step."""

    c: Controller
    now: float
    bms_ok: bool
    inv_ok: bool
    outage: bool
    floor: float
    request: Booked | None

    @property
    def soc_min(self) -> float:
        return self.c.bms.soc_min_pct if self.bms_ok else 0.0

    def path_closed(self) -> bool:
        return self.bms_ok and self.c.bms.energy_path_closed()

    def wants(self, kind: DispatchKind) -> bool:
        r = self.request
        return r is not None and r.request.kind is kind


Guard = Callable[[View], str | None]


def _locked_out(v: View) -> str | None:
    return "lockout: repeated faults, installer reset required" if v.c.faults.locked_out else None


def _reset(v: View) -> str | None:
    return None if v.c.faults.locked_out else "installer reset"


def _faulted(v: View) -> str | None:
    latches = v.c.faults.latches
    return f"fault: {', '.join(l.kind for l in latches)}" if latches else None


def _faults_cleared(v: View) -> str | None:
    return None if v.c.faults.latches else "faults cleared"


def _data_ready(v: View) -> str | None:
    return "BMS and inverter data ready" if v.bms_ok and v.inv_ok else None


def _grid_outage(v: View) -> str | None:
    return "grid outage: backing up the home" if v.outage else None


def _grid_restored(v: View) -> str | None:
    return None if v.outage else "grid restored"


def _discharge_wanted(v: View) -> str | None:
    if v.wants(DispatchKind.DISCHARGE) and v.path_closed() and v.soc_min > v.floor + ENTRY_HYSTERESIS_PCT:
        return f"dispatch {v.request.request.id}"
    return None


def _discharge_done(v: View) -> str | None:
    if not v.wants(DispatchKind.DISCHARGE):
        return "no discharge request in force"
    if not v.path_closed():
        return "inhibit: BMS state or contactors do not allow energy flow"
    if v.soc_min <= v.floor:
        return f"floor reached ({v.floor:.1f} %)"
    return None


def _charge_wanted(v: View) -> str | None:
    if v.wants(DispatchKind.CHARGE) and v.path_closed() and v.c.bms.soc_max_pct is not None \
            and v.c.bms.soc_max_pct < 100:
        return f"dispatch {v.request.request.id}"
    return None


def _charge_done(v: View) -> str | None:
    return None if _charge_wanted(v) else "no charge request in force, or pack full"


ANY = frozenset(Mode)
RUNNING = frozenset({Mode.STANDBY, Mode.DISCHARGE, Mode.CHARGE})


@dataclass(frozen=True)
class Rule:
    sources: frozenset[Mode]
    target: Mode
    guard: Guard


# Priority order: the first rule that fires wins. Safety, then outage backup,
# then the owner and dispatch (the owner's opt-out and reserve act inside the
# dispatch guards via the floor and the request in force), then idle.
TRANSITIONS: tuple[Rule, ...] = (
    Rule(ANY - {Mode.LOCKOUT}, Mode.LOCKOUT, _locked_out),
    Rule(frozenset({Mode.LOCKOUT}), Mode.STARTUP, _reset),
    Rule(ANY - {Mode.LOCKOUT, Mode.FAULT}, Mode.FAULT, _faulted),
    Rule(frozenset({Mode.FAULT}), Mode.STARTUP, _faults_cleared),
    Rule(frozenset({Mode.STARTUP}), Mode.STANDBY, _data_ready),
    Rule(RUNNING, Mode.BACKUP, _grid_outage),
    Rule(frozenset({Mode.BACKUP}), Mode.STANDBY, _grid_restored),
    Rule(frozenset({Mode.DISCHARGE}), Mode.STANDBY, _discharge_done),
    Rule(frozenset({Mode.CHARGE}), Mode.STANDBY, _charge_done),
    Rule(frozenset({Mode.STANDBY}), Mode.DISCHARGE, _discharge_wanted),
    Rule(frozenset({Mode.STANDBY}), Mode.CHARGE, _charge_wanted),
)


def settle(view: View, mode: Mode, reason: str) -> tuple[Mode, str, list[Transition]]:
    """Apply rules until none fires (each mode at most once, so it always ends)."""
    transitions: list[Transition] = []
    visited = {mode}
    while True:
        fired = next(((rule, why) for rule in TRANSITIONS if mode in rule.sources
                      for why in [rule.guard(view)] if why), None)
        if fired is None or fired[0].target in visited:
            return mode, reason, transitions
        rule, reason = fired
        transitions.append(Transition(view.now, mode.value, rule.target.value, reason))
        mode = rule.target
        visited.add(mode)


def diagram() -> str:
    """The state diagram as Mermaid text, generated from TRANSITIONS (README.md holds a copy)."""
    lines = ["stateDiagram-v2", "    [*] --> STARTUP"]
    for rule in TRANSITIONS:
        label = rule.guard.__name__.strip("_").replace("_", " ")
        sources = sorted(m.value for m in rule.sources if m is not rule.target)
        lines += [f"    {source} --> {rule.target.value}: {label}" for source in sources]
    return "\n".join(lines)


# ---------------------------------------------------------------- handlers


def _ramped(v: View, base: float, magnitude: float, dt: float) -> float:
    """Rise from `base` toward `magnitude` at the ramp rate; fall to it at once.

    Only increases ramp: a lower target (a new request, a cap) must hold in the
    very step it arrives, and the floor's own envelope does the gentle ramp-down.
    """
    rate = (v.request.request.ramp_w_per_s if v.request else None) or v.c.policy.ramp_w_per_s
    return min(magnitude, max(0.0, base) + rate * dt)


def _discharge(v: View, base: float, dt: float) -> tuple[float, str]:
    r = v.request
    return _ramped(v, base, r.target_w, dt), f"dispatch {r.request.id}: {r.target_w:.0f} W"


def _charge(v: View, base: float, dt: float) -> tuple[float, str]:
    r = v.request
    return -_ramped(v, -base, r.target_w, dt), f"dispatch {r.request.id}: charge {r.target_w:.0f} W"


def _backup(v: View, base: float, dt: float) -> tuple[float, str]:
    # Islanded, the inverter follows the home load; the setpoint is its ceiling.
    return v.c.policy.max_discharge_w, "backup: ceiling for the home load"


HANDLERS: dict[Mode, Callable[[View, float, float], tuple[float, str]]] = {
    Mode.DISCHARGE: _discharge,
    Mode.CHARGE: _charge,
    Mode.BACKUP: _backup,
}


def clamp(v: View, setpoint: float, reason: str) -> tuple[float, str]:
    """The one safety clamp: whatever the mode asked for, within every limit."""
    if setpoint == 0 or not math.isfinite(setpoint):
        return 0.0, reason if setpoint == 0 else "invalid: setpoint not a finite number"
    if not v.bms_ok:
        return 0.0, "stale: bms"
    if not v.inv_ok:
        return 0.0, "stale: inverter"
    if v.c.faults.locked_out or v.c.faults.latches:
        return 0.0, f"fault: {', '.join(v.c.faults.kinds) or 'lockout'}"
    if not v.path_closed():
        return 0.0, "inhibit: BMS state or contactors"
    bms, inv, policy = v.c.bms, v.c.inverter, v.c.policy
    if setpoint > 0:
        # The snapshot's SoC is as old as the snapshot: discount what may have left since.
        used_since = v.c.peak_since_bms_w * max(0.0, v.now - bms.received_at) / 3600
        energy = max(0.0, floors.energy_above_wh(policy, bms.soc_min_pct, v.floor) - used_since)
        limits = [("bms limit", bms.max_discharge_w), ("site limit", policy.max_discharge_w),
                  ("rating", inv.w_discha_max_rtg or inv.w_max_rtg or setpoint),
                  ("reserve", floors.discharge_envelope_w(policy, energy))]
    else:
        full = bms.soc_max_pct is not None and bms.soc_max_pct >= 100
        limits = [("bms limit", bms.max_charge_w), ("site limit", policy.max_charge_w),
                  ("rating", inv.w_cha_max_rtg or inv.w_max_rtg or -setpoint),
                  ("full", 0.0 if full else -setpoint)]
    name, limit = min(limits, key=lambda item: item[1])
    limit = max(0.0, limit)
    if abs(setpoint) > limit:
        return (limit if setpoint > 0 else -limit), f"clamped: {name}"
    return setpoint, reason


# ---------------------------------------------------------------- inputs


def _judgement(c: Controller, req: DispatchRequest, now: float) -> Judgement:
    policy, bms, inv = c.policy, c.bms, c.inverter
    refusal, detail = None, ""
    if c.faults.locked_out:
        refusal, detail = ReasonCode.LOCKOUT, "locked out until an installer reset"
    elif c.faults.latches:
        refusal, detail = ReasonCode.FAULT, "fault: " + ", ".join(c.faults.kinds)
    elif not bms_usable(bms, now, policy) or not inverter_usable(inv, now, policy):
        refusal, detail = ReasonCode.NO_DATA, "no fresh BMS or inverter data"
    elif inv.grid_outage:
        refusal, detail = ReasonCode.OUTAGE, "grid outage: serving the home"
    if refusal is not None:
        return Judgement(now, refusal, detail, False, 0, 0, 0, 0, policy.ramp_w_per_s)
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


def _answer(c: Controller, req: DispatchRequest, now: float) -> tuple[Controller, list[Event]]:
    events: list[Event] = []
    existing = c.book.find(req.id)
    bad = invalid_reason(req)
    if bad is not None:
        answer = DispatchAnswer(req.id, now, Verdict.REJECTED, reason=ReasonCode.INVALID, detail=bad)
    elif existing is not None and req.revision <= existing.request.revision:
        if replace(req, received_at=existing.request.received_at) == existing.request:
            return c, [replace(existing.answer, at=now)]  # idempotent: the same answer again
        answer = DispatchAnswer(req.id, now, Verdict.REJECTED, reason=ReasonCode.DUPLICATE,
                                detail=f"id already used with other content (revision {existing.request.revision})")
        return c, [answer]
    else:
        answer = judge(req, _judgement(c, req, now))
    rejected = answer.verdict is Verdict.REJECTED
    entry = Booked(req, answer, ended=rejected)
    earlier = existing if existing is not None and existing.accepted else None
    if earlier is not None and not earlier.ended and (rejected or req.kind is not earlier.request.kind):
        change = "refused" if rejected else f"changed it to {req.kind.value}"
        c, events = _end(c, earlier, now, f"revision {req.revision} {change}")
    if earlier is not None and rejected:
        return c, events + [answer]  # the book keeps the event as it ran, energy and all
    if earlier is not None and req.kind is earlier.request.kind:
        # A modification (or a renewal after it ended) continues the same event: its energy carries over.
        entry = replace(entry, meter_wh=earlier.meter_wh, integrated_wh=earlier.integrated_wh,
                        last_report_at=earlier.last_report_at)
    c = _evolve(c, book=c.book.add(entry))
    events.append(answer)
    if req.kind is DispatchKind.STOP and answer.verdict is Verdict.ACCEPTED:
        for entry in c.book.live():
            if entry.request.source == req.source and entry.request.id != req.id:
                c, ended = _end(c, entry, now, f"stopped by {req.id}")
                events += ended
        c = _evolve(c, book=c.book.end(req.id))
    return c, events


def _end(c: Controller, entry: Booked, now: float, why: str) -> tuple[Controller, list[Event]]:
    c = _evolve(c, book=c.book.replace(replace(entry, ended=True)))
    return c, [DispatchEnded(now, entry.request.id, why), _energy(c, entry, now, final=True)]


def _energy(c: Controller, entry: Booked, now: float, final: bool = False) -> EventEnergy:
    total = c.inverter.tot_wh_inj if c.inverter is not None and c.inverter.comms_ok else None
    return EventEnergy(now, entry.request.id, round(entry.meter_wh, 3), round(entry.integrated_wh, 3), final, total)


def _account(c: Controller, new: InverterStatus) -> Controller:
    """Add the energy between the last two inverter readings to the request being served."""
    prev, entry = c.inverter, c.book.find(c.serving_id) if c.serving_id else None
    if entry is None or prev is None or not (prev.comms_ok and new.comms_ok):
        return c
    dt = new.received_at - prev.received_at
    if dt <= 0:
        return c
    discharge = entry.request.kind is DispatchKind.DISCHARGE
    power = (prev.measured_w + new.measured_w) / 2
    integrated = (max(0.0, power) if discharge else min(0.0, power)) * dt / 3600
    meter = (new.tot_wh_inj - prev.tot_wh_inj) if discharge else (prev.tot_wh_abs - new.tot_wh_abs)
    if not _meter_plausible(meter if discharge else -meter, new, dt, c.policy):
        meter = integrated  # a meter that jumped or ran backwards is not billed; power stands in
    entry = replace(entry, meter_wh=entry.meter_wh + meter, integrated_wh=entry.integrated_wh + integrated)
    return _evolve(c, book=c.book.replace(entry))


def _meter_plausible(delta_wh: float, status: InverterStatus, dt: float, policy: Policy) -> bool:
    """A meter step is plausible when it is forward and no larger than twice the rating allows."""
    rating = max(status.w_max_rtg, policy.max_discharge_w, policy.max_charge_w)
    return 0.0 <= delta_wh <= 2 * rating * dt / 3600 + 1.0


def _absorb(c: Controller, item: Input, now: float) -> tuple[Controller, list[Event]]:
    if isinstance(item, BmsSnapshot):
        return _evolve(c, bms=item, bms_seen=c.bms_seen or bms_usable(item, item.received_at, c.policy),
                       peak_since_bms_w=max(0.0, c.setpoint_w)), []
    if isinstance(item, InverterStatus):
        c = _account(c, item)
        return _evolve(c, inverter=item, inverter_seen=c.inverter_seen or item.comms_ok), []
    if isinstance(item, OwnerSettings):
        return _evolve(c, owner=replace(item, reserve_pct=min(100.0, max(0.0, item.reserve_pct)))), []
    if isinstance(item, DispatchRequest):
        return _answer(c, item, now)
    if isinstance(item, DispatchCancel):
        entry = c.book.find(item.id)
        if entry is None or not entry.accepted or entry.ended or entry.request.source != item.source:
            return c, []  # one source cannot end another's event
        return _end(c, entry, now, f"cancelled by {item.source}")
    if isinstance(item, InstallerReset):
        book, events = c.faults.reset_lockout(now)
        return _evolve(c, faults=book), events
    return c, []  # Tick


def _expire(c: Controller, now: float) -> tuple[Controller, list[Event]]:
    events: list[Event] = []
    for entry in c.book.live():
        why = None
        if now >= entry.request.end:
            why = "window closed"
        elif entry.request.kind is DispatchKind.DISCHARGE and \
                c.owner.opted_out(max(now, entry.request.start), entry.request.id):
            why = "owner opted out"
        if why:
            c, ended = _end(c, entry, now, why)
            events += ended
    return c, events


def _report_energy(c: Controller, now: float) -> tuple[Controller, list[Event]]:
    entry = c.book.find(c.serving_id) if c.serving_id else None
    if entry is None or now - entry.last_report_at < c.policy.energy_report_interval_s:
        return c, []
    c = _evolve(c, book=c.book.replace(replace(entry, last_report_at=now)))
    return c, [_energy(c, entry, now)]


# ---------------------------------------------------------------- step


def step(c: Controller, inputs: Iterable[Input], now: float) -> StepResult:
    events: list[Event] = []
    for item in inputs:
        c, produced = _absorb(c, item, now)
        events += produced
    c, produced = _expire(c, now)
    events += produced
    present = conditions(c.bms, c.inverter, now, c.policy, c.bms_seen, c.inverter_seen)
    faults, produced = c.faults.update(present, now, c.policy)
    c = _evolve(c, faults=faults)
    events += produced

    view = View(c, now, bms_usable(c.bms, now, c.policy), inverter_usable(c.inverter, now, c.policy),
                c.outage(now), c.floor_pct(now), c.book.in_force(now))
    mode, reason, transitions = settle(view, c.mode, c.reason)
    events += transitions
    # Power rises from 0 at the ramp rate from the step that enters a mode, never from a stale setpoint.
    same_mode = mode is c.mode and c.last_step_at is not None
    base, dt = (c.setpoint_w, max(0.0, now - c.last_step_at)) if same_mode else (0.0, 0.0)
    handler = HANDLERS.get(mode)
    setpoint, reason = handler(view, base, dt) if handler else (0.0, reason)
    setpoint, reason = clamp(view, setpoint, reason)
    serving = view.request.request.id if mode in (Mode.DISCHARGE, Mode.CHARGE) and view.request else None
    c = _evolve(c, mode=mode, setpoint_w=setpoint, reason=reason, serving_id=serving, last_step_at=now,
                peak_since_bms_w=max(c.peak_since_bms_w, setpoint))
    c, produced = _report_energy(c, now)
    events += produced
    return StepResult(c, InverterCommand(setpoint, reason), events)
