"""The controller: `step(controller, inputs, now) -> StepResult`, pure.

Shape of one step (h11-style, no I/O, time injected):
  1. absorb each input in order (a dispatch request is answered on arrival);
     a `Stall` (the gateway's own pause) starts a resync: 0 W until fresh data;
  2. end a resync once fresh data came, end requests whose window closed or that
     the owner opted out of;
  3. update the fault latches from the conditions now present (stale data
     raises no new fault while resyncing: the gateway's stall is its own);
  4. settle the mode: walk TRANSITIONS (data, in priority order) until no rule
     fires, so a sudden change lands in the right mode in this very step;
  5. the mode's handler proposes a setpoint;
  6. one safety clamp, blind to the mode, cuts it to every limit.
The priority order safety > outage backup > owner > dispatch > idle lives in
the order of TRANSITIONS and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from firmware_py.core import floor as floors
from firmware_py.core import prices
from firmware_py.core.answers import answer, apply_stop, cancel, enter_service_detail
from firmware_py.core.controller import Controller, StepResult
from firmware_py.core.energy import (
    account,
    close_event,
    commanded_wh,
    release_energy,
    report_energy,
)
from firmware_py.core.faults import (
    bms_usable,
    conditions,
    forgive_stall,
    inverter_usable,
)
from firmware_py.core.requests import Booked
from firmware_py.core.types import (
    BmsSnapshot,
    CalendarDay,
    DispatchCancel,
    DispatchKind,
    DispatchRequest,
    Event,
    Input,
    InstallerReset,
    InverterCommand,
    InverterStatus,
    JournalHealth,
    Mode,
    OwnerSettings,
    PriceInterval,
    Resynced,
    ServingChanged,
    SiteLimit,
    Stall,
    Transition,
    is_finite_number,
)

__all__ = ["RAMP_START_S", "TRANSITIONS", "Controller", "Mode", "StepResult", "diagram", "step"]

ENTRY_HYSTERESIS_PCT = floors.ENTRY_HYSTERESIS_PCT  # enter DISCHARGE only this far above the floor
OPTED_OUT_END = "owner opted out"
RAMP_START_S = 0.01
"""A ramping mode's first step holds 0 W; the step this long after gives its first watts. Without it the
first watts would wait for the adapter's next tick (up to 100 ms in `run`), the largest share of a
dispatch's latency after the aggregator's own poll."""
RAMPING_MODES = frozenset({Mode.DISCHARGE, Mode.CHARGE})
JOURNAL_HOLD = "journal: unavailable, dispatch held at 0 W"
"""The reason (command and transition) while dispatch waits for the journal to write again."""


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

    @property
    def storm_pct(self) -> float | None:
        """The storm watch's SoC while the grid is up (in an outage the house may use what it kept)."""
        return None if self.outage else self.c.owner.storm_watch(self.now)

    def can_charge(self) -> bool:
        """The site may charge and the inverter says it can (SunSpec 702 WChaRteMaxRtg above 0)."""
        inv = self.c.inverter
        return self.c.policy.max_charge_w > 0 and inv is not None and inv.w_cha_max_rtg > 0

    def storm_charge(self, entering: bool) -> str | None:
        """Why to charge for the storm watch, or None: below its SoC (by the entry hysteresis when
        entering, so noise at the target cannot toggle the mode), where the inverter can charge."""
        target = self.storm_pct
        if target is None or not self.can_charge():
            return None
        below = target - (ENTRY_HYSTERESIS_PCT if entering else 0.0)
        return f"storm watch: charging toward {target:g} %" if self.soc_min < below else None


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


def _journal_failing(v: View) -> str | None:
    """Energy the gateway cannot account for is not delivered: while the journal fails, dispatch
    holds at 0 W. The request stays in force, so it resumes once the journal writes again."""
    return f"{JOURNAL_HOLD}: {v.c.journal.detail or 'write failed'}" if v.c.journal_failing() else None


def _discharge_wanted(v: View) -> str | None:
    if v.c.journal_failing():
        return None
    if v.wants(DispatchKind.DISCHARGE) and v.path_closed() and v.soc_min > v.floor + ENTRY_HYSTERESIS_PCT:
        return f"{'price' if v.request.price_driven else 'dispatch'} {v.request.request.id}"
    return None


def _discharge_done(v: View) -> str | None:
    if not v.wants(DispatchKind.DISCHARGE):
        return "no discharge request in force"
    if not v.path_closed():
        return "inhibit: BMS state or contactors do not allow energy flow"
    if v.soc_min <= v.floor:
        held = " by the storm watch" if not v.outage and floors.storm_watch_binds(v.c.policy, v.c.owner, v.now) else ""
        return f"floor reached ({v.floor:.1f} %{held})"
    return None


def _charge_wanted(v: View, entering: bool = True) -> str | None:
    """A charge request in force, or the storm watch below its SoC; the path closed and the pack not full."""
    soc_max = v.c.bms.believed("soc_max_pct")
    if not v.path_closed() or soc_max is None or not soc_max < 100 \
            or v.c.journal_failing():  # energy that cannot be accounted for does not move
        return None
    if v.wants(DispatchKind.CHARGE):
        return f"dispatch {v.request.request.id}"
    return v.storm_charge(entering)


def _charge_done(v: View) -> str | None:
    return None if _charge_wanted(v, entering=False) else "no charge request in force, storm watch met, or pack full"


ANY = frozenset(Mode)
RUNNING = frozenset({Mode.STANDBY, Mode.DISCHARGE, Mode.CHARGE})


@dataclass(frozen=True)
class Rule:
    sources: frozenset[Mode]
    target: Mode
    guard: Guard


# Priority order: the first rule that fires wins. Safety, then outage backup,
# then the owner and dispatch (the owner's opt-out and reserve act inside the
# dispatch guards via the floor and the request in force), then idle. The
# journal rule is a condition of dispatch itself (no energy is delivered that
# cannot be accounted for): it only ever ends dispatch, below the outage.
TRANSITIONS: tuple[Rule, ...] = (
    Rule(ANY - {Mode.LOCKOUT}, Mode.LOCKOUT, _locked_out),
    Rule(frozenset({Mode.LOCKOUT}), Mode.STARTUP, _reset),
    Rule(ANY - {Mode.LOCKOUT, Mode.FAULT}, Mode.FAULT, _faulted),
    Rule(frozenset({Mode.FAULT}), Mode.STARTUP, _faults_cleared),
    Rule(frozenset({Mode.STARTUP}), Mode.STANDBY, _data_ready),
    Rule(RUNNING, Mode.BACKUP, _grid_outage),
    Rule(frozenset({Mode.BACKUP}), Mode.STANDBY, _grid_restored),
    Rule(frozenset({Mode.DISCHARGE, Mode.CHARGE}), Mode.STANDBY, _journal_failing),
    Rule(frozenset({Mode.DISCHARGE}), Mode.STANDBY, _discharge_done),
    Rule(frozenset({Mode.CHARGE}), Mode.STANDBY, _charge_done),
    Rule(frozenset({Mode.STANDBY}), Mode.DISCHARGE, _discharge_wanted),
    Rule(frozenset({Mode.STANDBY}), Mode.CHARGE, _charge_wanted),
)


RULES_FROM: dict[Mode, tuple[Rule, ...]] = {mode: tuple(r for r in TRANSITIONS if mode in r.sources) for mode in Mode}
"""TRANSITIONS by source mode, in the same order: a step asks only the guards that may fire."""


def settle(view: View, mode: Mode, reason: str) -> tuple[Mode, str, list[Transition]]:
    """Apply rules until none fires (each mode at most once, so it always ends)."""
    transitions: list[Transition] = []
    visited = {mode}
    while True:
        fired = next(((rule, why) for rule in RULES_FROM[mode] if (why := rule.guard(view))), None)
        if fired is None or fired[0].target in visited:
            return mode, reason, transitions
        rule, reason = fired
        transitions.append(Transition(view.now, mode, rule.target, reason))
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


def _ramped(v: View, base: float, magnitude: float, dt: float, kind: DispatchKind) -> float:
    """Rise from `base` toward `magnitude` at the ramp rate; fall to it at once.

    Only increases ramp: a lower target (a new request, a cap) must hold in the
    very step it arrives, and the floor's own envelope does the gentle ramp-down.
    The request's own ramp applies only to power of its own kind.
    """
    own = v.request.request.ramp_w_per_s if v.wants(kind) else None
    return min(magnitude, max(0.0, base) + (own or v.c.policy.ramp_w_per_s) * dt)


def _discharge(v: View, base: float, dt: float) -> tuple[float, str]:
    r = v.request
    if r.price is not None:  # the day's budget left ramps it down so the energy stops at the budget
        power = min(r.target_w, prices.owner_power_w(v.c.owner), prices.budget_power_w(v.c, v.now))
        return _ramped(v, base, power, dt, DispatchKind.DISCHARGE), (
            f"price {r.request.id}: {r.price.price_per_kwh:g} per kWh, {power:.0f} W")
    return _ramped(v, base, r.target_w, dt, DispatchKind.DISCHARGE), f"dispatch {r.request.id}: {r.target_w:.0f} W"


def _charge(v: View, base: float, dt: float) -> tuple[float, str]:
    """A charge request's power; the storm watch charges at the site's charge limit (the clamp then
    holds it to the BMS's and the inverter's). Both at once: the larger, both want the pack fuller."""
    wanted: list[tuple[float, str]] = []
    if v.wants(DispatchKind.CHARGE):
        r = v.request
        wanted.append((r.target_w, f"dispatch {r.request.id}: charge {r.target_w:.0f} W"))
    if (storm := v.storm_charge(entering=False)) is not None:
        wanted.append((v.c.policy.max_charge_w, storm))
    if not wanted:
        return 0.0, "no charge wanted"
    magnitude, reason = max(wanted, key=lambda item: item[0])
    return -_ramped(v, -base, magnitude, dt, DispatchKind.CHARGE), reason


def _backup(v: View, base: float, dt: float) -> tuple[float, str]:
    # Islanded, the inverter follows the home load; the setpoint is its ceiling.
    return v.c.policy.max_discharge_w, "backup: ceiling for the home load"


def _fault(v: View, base: float, dt: float) -> tuple[float, str]:
    # The reason FAULT was entered with names the latches of that step; one of them may clear while
    # another holds the mode, and the reason must not keep naming it.
    return 0.0, _faulted(v) or "fault"


HANDLERS: dict[Mode, Callable[[View, float, float], tuple[float, str]]] = {
    Mode.DISCHARGE: _discharge,
    Mode.CHARGE: _charge,
    Mode.BACKUP: _backup,
    Mode.FAULT: _fault,
}


def clamp(v: View, setpoint: float, reason: str) -> tuple[float, str]:
    """The one safety clamp: whatever the mode asked for, within every limit."""
    if v.c.resyncing:
        return 0.0, f"resync: the gateway stalled {v.c.stall_gap_s:.1f} s; waiting for fresh BMS and inverter data"
    if setpoint == 0 or not is_finite_number(setpoint):
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
    if inv.enter_service_s > 0 and not v.outage:
        return 0.0, f"enter service: {enter_service_detail(inv.enter_service_s)}"
    if setpoint > 0:
        # The snapshot's SoC is as old as the snapshot: discount what may have left since.
        used_since = v.c.peak_since_bms_w * max(0.0, v.now - bms.received_at) / 3600
        energy = max(0.0, floors.energy_above_wh(policy, bms.soc_min_pct, v.floor) - used_since)
        # A site controller's limit is on what goes to the grid; islanded, the home's load is no export.
        site = policy.max_discharge_w if v.outage else v.c.site_limit_w(discharge=True)
        limits = [("bms limit", bms.max_discharge_w), ("site limit", site),
                  ("rating", inv.discharge_rating_w()),
                  ("reserve", floors.discharge_envelope_w(policy, energy))]
    else:
        soc_max = bms.believed("soc_max_pct")
        full = soc_max is None or not soc_max < 100  # unknown, stale or NaN: not known to have room
        limits = [("bms limit", bms.max_charge_w), ("site limit", v.c.site_limit_w(discharge=False)),
                  ("rating", inv.charge_rating_w()),  # 0: it cannot charge, as `can_charge` reads it
                  ("full", 0.0 if full else -setpoint)]
    name, limit = min(limits, key=lambda item: item[1])
    limit = max(0.0, limit)
    if abs(setpoint) > limit:
        return (limit if setpoint > 0 else -limit), f"clamped: {name}"
    return setpoint, reason


# ---------------------------------------------------------------- inputs


def _absorb(c: Controller, item: Input, now: float) -> tuple[Controller, list[Event]]:
    if isinstance(item, BmsSnapshot):
        if not _believable_time(item.received_at, c.bms, now) or _overtaken(item, c.bms, now):
            return c, []
        return c.evolve(bms=item, bms_seen=c.bms_seen or bms_usable(item, item.received_at, c.policy),
                       peak_since_bms_w=max(0.0, c.setpoint_w)), []
    if isinstance(item, InverterStatus):
        if not _believable_time(item.received_at, c.inverter, now):
            return c, []
        c = account(c, item, now)
        if not item.comms_ok:  # energy may flow on until the revert: still unread, counted from the last good
            return c.evolve(inverter=item), []
        held = c.metered
        moved = held is None or (item.tot_wh_inj, item.tot_wh_abs) != (held.tot_wh_inj, held.tot_wh_abs)
        commanded = commanded_wh(c, now)
        return c.evolve(inverter=item, inverter_seen=True, metered=item, metered_serving=c.serving_id,
                        meter_moved_at=item.received_at if moved else c.meter_moved_at,
                        meter_moved_commanded_wh=commanded if moved else c.meter_moved_commanded_wh,
                        peak_since_inverter_w=max(0.0, c.setpoint_w), metered_commanded_wh=commanded), []
    if isinstance(item, OwnerSettings):
        # A reserve that is no number keeps the one in force: max(0, NaN) would make it 0 %.
        reserve = min(100.0, max(0.0, item.reserve_pct)) if is_finite_number(item.reserve_pct) else c.owner.reserve_pct
        owner = prices.settled_owner(replace(item, reserve_pct=reserve))
        return c.evolve(owner=owner), []
    if isinstance(item, DispatchRequest):
        return answer(c, item, now)
    if isinstance(item, PriceInterval):
        return prices.answer_price(c, item, now)
    if isinstance(item, CalendarDay):
        return prices.new_day(c, item), []
    if isinstance(item, DispatchCancel):
        return cancel(c, item, now)
    if isinstance(item, JournalHealth):
        return c.evolve(journal=item), []
    if isinstance(item, InstallerReset):
        book, events = c.faults.reset_lockout(now)
        return c.evolve(faults=book), events
    if isinstance(item, Stall):
        return c.evolve(resync_since=now, stall_gap_s=item.gap_s), []
    if isinstance(item, SiteLimit):
        return c.with_site_limit(item), []
    return c, []  # Tick


def _readings_first(inputs: Iterable[Input]) -> Sequence[Input]:
    """Readings tell what happened up to now; requests, cancels and settings act at now. Readings go first, so
    an event ended in this step has the energy up to now in its final record whatever order the inputs came in."""
    inputs = inputs if isinstance(inputs, (list, tuple)) else list(inputs)
    if len(inputs) < 2:
        return inputs
    return sorted(inputs, key=lambda item: not isinstance(item, (BmsSnapshot, InverterStatus)))


def _believable_time(received_at: float, held: BmsSnapshot | InverterStatus | None, now: float) -> bool:
    """Data stamped after `now` would look fresh for as long as its stamp is ahead (and hide all real data
    behind it); data older than what the core holds (a receive thread's hop overtaken by a tick, a late
    poll) would set freshness and the meter back. Neither is believed. Unless what the core holds is itself
    stamped after `now`: the clock it was stamped on went back (a replay or a bench fed out of order), and
    the reading in hand is the only one on the clock the core now runs on."""
    return received_at <= now and (held is None or received_at >= held.received_at or held.received_at > now)


def _overtaken(item: BmsSnapshot, held: BmsSnapshot | None, now: float) -> bool:
    """A snapshot whose stale set was worked out (`as_of`) before that of the one the core holds: a frame
    path's hop overtaken by a tick. It may show fresh a field the core has already seen stale, with the
    same `received_at`; refused, so a stale field is fresh again only through a new frame for it. As
    with `_believable_time`, a held `as_of` after `now` (the clock went back) does not count."""
    return (item.as_of is not None and held is not None and held.as_of is not None
            and item.as_of < held.as_of <= now)


def _resync(c: Controller, now: float) -> tuple[Controller, list[Event]]:
    """End the wait that followed a stall, once both links delivered data received since it.

    BMS data must be a whole BMS timeout younger than the stall: frames queued
    while the gateway was stopped are decoded (and stamped) right after it, and
    only data that stayed fresh that long is the vehicle's present. If the data
    does not come within the grace, the links are down for real: the wait ends
    and stale data faults as it always does.
    """
    since, p = c.resync_since, c.policy
    if since is None:
        return c, []
    fresh = (bms_usable(c.bms, now, p) and c.bms.received_at >= since + p.bms_timeout_s
             and inverter_usable(c.inverter, now, p) and c.inverter.received_at >= since)
    if not fresh and now - since < p.resync_grace_s:
        return c, []
    return c.evolve(resync_since=None), [Resynced(now, c.stall_gap_s, now - since, fresh)]


def _expire(c: Controller, now: float) -> tuple[Controller, list[Event]]:
    """End what its window, or the owner's opt-out, ends; then apply the STOPs whose window has begun
    (after, so an event whose window closed as a STOP began is ended by its window, as it was)."""
    events: list[Event] = []
    for entry in c.book.live:
        why = None
        if entry.request.kind is DispatchKind.STOP:
            continue
        if now >= entry.request.end:
            why = "window closed"
        elif entry.request.kind is DispatchKind.DISCHARGE and \
                c.owner.opted_out(max(now, entry.request.start), entry.request.id):
            why = OPTED_OUT_END
        if why:
            c, ended = close_event(c, entry, now, why)
            if why == OPTED_OUT_END:
                c = c.evolve(book=c.book.replace(replace(c.book.find(entry.request.id), stopped_by_owner=True)))
            events += ended
    for entry in c.book.live:
        if entry.request.kind is DispatchKind.STOP and entry.request.start <= now and \
                not c.book.find(entry.request.id).ended:  # another STOP applied before may have ended it
            c, ended = apply_stop(c, entry.request, now)
            events += ended
    return c, events


# ---------------------------------------------------------------- step


def step(c: Controller, inputs: Iterable[Input], now: float) -> StepResult:
    events: list[Event] = []
    for item in _readings_first(inputs):
        c, produced = _absorb(c, item, now)
        events += produced
    if c.resync_since is not None:
        c, produced = _resync(c, now)
        events += produced
    c, produced = _expire(c, now)
    events += produced
    c, produced = prices.follow(c, now)
    events += produced
    present = conditions(c.bms, c.inverter, now, c.policy, c.bms_seen, c.inverter_seen)
    if c.resync_since is not None:
        present = forgive_stall(present, c.faults.kinds)
    faults, produced = c.faults.update(present, now, c.policy)
    c = c.evolve(faults=faults)
    events += produced

    view = View(c, now, bms_usable(c.bms, now, c.policy), inverter_usable(c.inverter, now, c.policy),
                c.outage(now), c.floor_pct(now), c.book.in_force(now))
    mode, mode_reason, transitions = settle(view, c.mode, c.mode_reason)
    events += transitions
    # Power rises from 0 at the ramp rate from the step that enters a mode, never from a stale setpoint.
    same_mode = mode is c.mode and c.last_step_at is not None
    base, dt = (c.setpoint_w, max(0.0, now - c.last_step_at)) if same_mode else (0.0, 0.0)
    handler = HANDLERS.get(mode)
    setpoint, reason = handler(view, base, dt) if handler else (0.0, mode_reason)
    setpoint, reason = clamp(view, setpoint, reason)
    serving = view.request.request.id if view.request and (
        (mode is Mode.DISCHARGE and view.wants(DispatchKind.DISCHARGE))
        or (mode is Mode.CHARGE and view.wants(DispatchKind.CHARGE))) else None  # not the storm watch's charge
    c, produced = release_energy(c, serving, mode is Mode.BACKUP, now)
    events += produced
    if serving != c.serving_id:
        events.append(ServingChanged(now, serving))
    c = c.evolve(mode=mode, mode_reason=mode_reason, setpoint_w=setpoint, reason=reason, serving_id=serving,
                last_step_at=now, peak_since_bms_w=max(c.peak_since_bms_w, setpoint),
                peak_since_inverter_w=max(c.peak_since_inverter_w, setpoint), commanded_wh=commanded_wh(c, now))
    c, produced = report_energy(c, now)
    events += produced
    again = now + RAMP_START_S if mode in RAMPING_MODES and not same_mode else None
    return StepResult(c, InverterCommand(setpoint, reason), events, again)
