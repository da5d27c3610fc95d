"""The values that cross the boundary of the pure core.

Every input carries the time it was received (`received_at`, seconds on the
runtime's one time base: the monotonic clock in `run`, simulated seconds in `sim`;
see `firmware_py/clocks.py`), so the core can judge freshness itself instead of
trusting the caller's timing. Instants a person or an aggregator gave in wall time
(event windows, departure, opt-out) arrive already converted to that base.
Signs (docs/README.md): positive power = discharge (vehicle -> AC side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, IntEnum, StrEnum
from functools import cached_property
from typing import Any


def is_finite_number(x: object) -> bool:
    """A real int or float that is neither nan nor ±inf.

    Rejects bools (a `True` target is a bug, not 1 W) and anything that is not a
    number, so every boundary that takes numbers from outside asks the same question.
    """
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float: not a quantity anything here can hold
        return False


def is_whole_number(x: object) -> bool:
    """A real int: not a bool (`True` is no count, revision or priority), nor a float that looks whole."""
    return isinstance(x, int) and not isinstance(x, bool)


class Mode(str, Enum):
    """The controller's operating mode: one at a time, settled by the transition table."""

    STARTUP = "STARTUP"
    STANDBY = "STANDBY"
    DISCHARGE = "DISCHARGE"
    CHARGE = "CHARGE"
    BACKUP = "BACKUP"
    FAULT = "FAULT"
    LOCKOUT = "LOCKOUT"


class FaultKind(StrEnum):
    """Every fault the core latches; the value is what the journal stores."""

    BMS_STALE = "bms_stale"
    BMS_FAULT = "bms_fault"
    CONTACTOR_WELDED = "contactor_welded"
    OVER_TEMP = "over_temp"
    UNDER_TEMP = "under_temp"
    INVERTER_COMMS = "inverter_comms"
    INVERTER_FAULT = "inverter_fault"
    LOCKOUT = "lockout"  # repeated faults: only an installer reset clears it


class BmsState(IntEnum):
    """0x212 BMS state (docs/can.md)."""

    STANDBY = 0
    DRIVE = 1
    SUPPORT = 2
    CHARGE = 3
    FEIM = 4
    CLEAR_FAULT = 5
    FAULT = 6
    WELD = 7
    TEST = 8
    SNA = 9
    DIAG = 10


class ContactorState(IntEnum):
    """0x212 contactor state."""

    SNA = 0
    OPEN = 1
    OPENING = 2
    CLOSING = 3
    CLOSED = 4
    WELDED = 5
    BLOCKED = 6


class PackContactor(IntEnum):
    """0x20A pack contactor (negative and positive) state."""

    SNA = 0
    OPEN = 1
    PRECHARGE = 2
    BLOCKED = 3
    PULLED_IN = 4
    OPENING = 5
    ECONOMIZED = 6
    WELDED = 7


ENERGY_BMS_STATES = frozenset({BmsState.STANDBY, BmsState.SUPPORT, BmsState.CHARGE})
FAULT_BMS_STATES = frozenset({BmsState.FAULT, BmsState.WELD})
"""BMS states that are a fault of the pack itself (latched by the core, refused by commissioning)."""
CLOSED_PACK_CONTACTORS = frozenset({PackContactor.PULLED_IN, PackContactor.ECONOMIZED})
CRITICAL_BMS_FIELDS = ("soc_min_pct", "max_discharge_w", "max_charge_w", "bms_state",
                       "contactor_state", "pack_contactor_neg", "pack_contactor_pos",
                       "min_temp_c", "max_temp_c")
"""Fields without which no power decision can be made safely (a silent thermal message
would otherwise switch the temperature checks off)."""


@dataclass(frozen=True)
class BmsSnapshot:
    """What the BMS said, as of `received_at`.

    A field is None until its message has been received once. `stale` names the
    fields whose source message has missed its timeout (3 periods) or was
    rejected as implausible: the core treats a stale field exactly like a
    missing one, so a silent message can never keep an old "all clear" alive.

    `received_at` is when the data was last believed (how old it is); `as_of`, on
    the same clock, is when `stale` was worked out. A snapshot handed over from
    another thread can arrive after one worked out later: the core refuses a
    snapshot whose `as_of` is older than the one it holds, so a field it has seen
    stale is never fresh again before a new frame for it. None (a builder's, an
    old journal's): no such order is known, and only `received_at` is judged.
    """

    received_at: float
    soc_min_pct: float | None = None
    soc_ui_pct: float | None = None
    soc_max_pct: float | None = None
    soc_avg_pct: float | None = None
    pack_voltage_v: float | None = None
    pack_current_a: float | None = None
    max_discharge_w: float | None = None
    max_charge_w: float | None = None
    min_temp_c: float | None = None
    max_temp_c: float | None = None
    bms_state: int | None = None
    contactor_state: int | None = None
    hv_state: int | None = None
    isolation_kohm: float | None = None
    pack_contactor_neg: int | None = None
    pack_contactor_pos: int | None = None
    hvil_ok: bool | None = None
    nominal_full_wh: float | None = None
    nominal_remaining_wh: float | None = None
    energy_buffer_wh: float | None = None
    expected_remaining_wh: float | None = None
    brick_v_min: float | None = None
    brick_v_max: float | None = None
    lifetime_discharge_wh: float | None = None
    lifetime_charge_wh: float | None = None
    stale: frozenset[str] = frozenset()
    as_of: float | None = None

    def fresh(self, name: str) -> bool:
        """True when field `name` has a value that is neither missing nor stale."""
        return getattr(self, name) is not None and name not in self.stale

    def believed(self, name: str) -> Any:
        """Field `name` when fresh, else None: what a decision reads, a stale value being no value."""
        return getattr(self, name) if name not in self.stale else None

    @cached_property
    def missing_critical(self) -> tuple[str, ...]:
        """The critical fields missing or stale, in `CRITICAL_BMS_FIELDS` order.

        A snapshot never changes, and a step asks this of it several times (freshness,
        the fault conditions, the view): worked out once, on first asking.
        """
        return tuple(name for name in CRITICAL_BMS_FIELDS if not self.fresh(name))

    def energy_path_closed(self) -> bool:
        """docs/can.md: energy may flow only in these BMS and contactor states."""
        needed = ("bms_state", "contactor_state", "pack_contactor_neg", "pack_contactor_pos")
        if not all(self.fresh(n) for n in needed):
            return False
        return (
            self.bms_state in ENERGY_BMS_STATES
            and self.contactor_state == ContactorState.CLOSED
            and self.pack_contactor_neg in CLOSED_PACK_CONTACTORS
            and self.pack_contactor_pos in CLOSED_PACK_CONTACTORS
        )


class InverterState(IntEnum):
    """SunSpec model 701 InvSt."""

    OFF = 0
    SLEEPING = 1
    STARTING = 2
    RUNNING = 3
    THROTTLED = 4
    SHUTTING_DOWN = 5
    FAULT = 6
    STANDBY = 7


def nameplate_discharge_w(w_max_rtg: float | None, w_discha_max_rtg: float | None) -> float:
    """The most an inverter's SunSpec 702 nameplate lets it discharge; the one rule the core and
    commissioning both read. A `WDisChaRteMaxRtg` reported as 0 (or below) is "it cannot discharge": 0 W,
    as a `WChaRteMaxRtg` of 0 is "it cannot charge" (read as "not reported", it let an inverter that said
    it cannot discharge be commanded to, at its AC rating). Otherwise the lower of its AC rating
    (`WMaxRtg`) and its storage discharge rate, each only where reported (None, or a `WMaxRtg` of 0, is
    "not reported"); neither reported, no bound. A 7.6 kW AC unit behind an 11.5 kW DC port is a 7.6 kW
    discharger."""
    if w_discha_max_rtg is not None and w_discha_max_rtg <= 0:
        return 0.0
    return min((r for r in (w_max_rtg, w_discha_max_rtg) if r), default=math.inf)


@dataclass(frozen=True)
class InverterStatus:
    """What the inverter reported, or that it could not be reached.

    `comms_ok = False` carries the cause in `error`; every transport failure
    becomes one of these instead of an exception, and the core answers it with 0 W.
    """

    received_at: float
    comms_ok: bool = True
    error: str | None = None
    measured_w: float = 0.0
    inv_state: int = InverterState.OFF
    grid_connected: bool = True
    grid_outage: bool = False
    alarms: int = 0
    tot_wh_inj: float = 0.0
    tot_wh_abs: float = 0.0
    w_max_rtg: float = 0.0
    w_cha_max_rtg: float = 0.0
    w_discha_max_rtg: float | None = None
    """SunSpec 702 `WDisChaRteMaxRtg`: None when not reported; 0 (or below) is "it cannot discharge"."""
    wset_w: float | None = None
    enter_service_s: float = 0.0
    """Seconds left on the inverter's IEEE 1547 enter-service delay (model 703 `ESDlyRemTms`) after
    the grid came back: it may not export (or draw) until then. 0 when none, or not reported."""

    @property
    def faulted(self) -> bool:
        return self.inv_state == InverterState.FAULT

    def discharge_rating_w(self) -> float:
        """The most its nameplate lets it discharge (`nameplate_discharge_w`)."""
        return nameplate_discharge_w(self.w_max_rtg, self.w_discha_max_rtg)

    def charge_rating_w(self) -> float:
        """The most its nameplate lets it charge: its storage charge rate (`WChaRteMaxRtg`; 0 is "it cannot
        charge", as `can_charge` reads it), lowered by its AC rating (`WMaxRtg`) where reported."""
        return min(self.w_cha_max_rtg, self.w_max_rtg) if self.w_max_rtg != 0 else self.w_cha_max_rtg


@dataclass(frozen=True)
class InverterCommand:
    """The one setpoint the core wants the inverter at, and why."""

    setpoint_w: float
    reason: str


class DispatchKind(str, Enum):
    DISCHARGE = "discharge"
    CHARGE = "charge"
    STOP = "stop"


@dataclass(frozen=True)
class DispatchRequest:
    """One request from an aggregator (docs/dispatch.md); `start`/`end` on the core clock.

    `revision` lets a source modify an event it already sent (OpenADR's
    modificationNumber): the same id at a higher revision replaces it; the same
    id and revision again is a duplicate and gets the original answer.
    `end = math.inf` is an open-ended request (a standing setpoint "until told
    otherwise"): there is no window to budget, so it is followed up to every
    limit and the floor's envelope ends it (`is_open_ended`).
    `priority` is the source's own rank for requests whose windows overlap (an
    OpenADR event's priority): the lower the number the more it matters, and None
    ranks after every number. It orders one source's requests only (`in_force`).
    """

    id: str
    source: str
    kind: DispatchKind
    target_w: float
    start: float
    end: float
    received_at: float
    ramp_w_per_s: float | None = None
    revision: int = 0
    priority: int | None = None

    @property
    def is_open_ended(self) -> bool:
        """No end: followed until cancelled or the floor, never budgeted over a window."""
        return self.end == math.inf


@dataclass(frozen=True)
class DispatchCancel:
    """Ends a request early; its energy so far still counts. `reason` says why when the source
    inferred it (an OpenADR event missing from a complete distribution: implicit cancellation)."""

    id: str
    source: str
    received_at: float
    reason: str = ""


@dataclass(frozen=True)
class SiteLimit:
    """The most power (W, each direction) any source's request may be served at, as `source` sets it.

    A site controller's SunSpec `WMaxLimPct` arrives as one of these: the limit is the site's, so
    it caps OpenADR and scheduled requests as much as the controller's own. `limit_w = None`
    lifts that source's limit. The limit in force is the lowest of every source's, and never
    above the configured `max_discharge_w` / `max_charge_w`. An export limit (OpenADR 3's
    `EXPORT_CAPACITY_LIMIT`, `export_only`) caps discharge only: charging imports, it exports nothing.
    """

    received_at: float
    source: str
    limit_w: float | None
    export_only: bool = False


class PriceKind(str, Enum):
    """What a published price is paid for (OpenADR 3 payload types of the same names)."""

    PRICE = "PRICE"  # the price of energy bought from the grid
    EXPORT_PRICE = "EXPORT_PRICE"  # the price paid for energy sent to the grid


@dataclass(frozen=True)
class PriceInterval:
    """One published price for one interval (docs/dispatch.md, price-responsive mode).

    A price is not a request: nobody asked for power. It is a fact the core weighs
    against the owner's threshold and daily energy budget, so the decision to
    discharge for it is made (and replayed) where every other decision is. `id`
    names the interval within its source (event id and interval id); the same id at
    a higher `revision` replaces it. `price_per_kwh` is in the program's currency.
    """

    id: str
    source: str
    program: str
    kind: PriceKind
    price_per_kwh: float
    start: float
    end: float
    received_at: float
    revision: int = 0


@dataclass(frozen=True)
class OwnerSettings:
    """The owner's wishes. `opt_out_until` = math.inf opts out until revoked.

    Storm watch (`storm_watch_floor_pct` until `storm_watch_until`): the owner, or an
    automation watching the weather, keeps that much in the pack for an outage that may
    come. Until then the floor is at least that SoC while the grid is up (dispatch below
    it is refused `STORM_WATCH`), and the truck charges toward it where the inverter can;
    when the outage does come, the house may use it down to the backup floor as always.

    Price-responsive mode (docs/dispatch.md): while a published price of `price_kind` in
    force is at least `price_threshold_per_kwh` (the program's currency), the truck
    discharges at `price_power_w` (None: as much as every limit allows) until
    `price_max_wh_per_day` of price-driven energy has gone out that calendar day.
    `price_threshold_per_kwh = None` turns the mode off.
    """

    reserve_pct: float
    received_at: float
    opt_out_until: float | None = None
    opt_out_events: frozenset[str] = frozenset()
    departure_at: float | None = None
    departure_soc_pct: float | None = None
    storm_watch_floor_pct: float | None = None
    storm_watch_until: float | None = None
    price_threshold_per_kwh: float | None = None
    price_max_wh_per_day: float = 0.0
    price_kind: PriceKind = PriceKind.EXPORT_PRICE
    price_power_w: float | None = None

    @property
    def price_mode(self) -> bool:
        """Price-responsive mode is on: a threshold is set and the day's budget is above 0 Wh."""
        return self.price_threshold_per_kwh is not None and self.price_max_wh_per_day > 0

    def opted_out(self, now: float, event_id: str | None = None) -> bool:
        if self.opt_out_until is not None and now < self.opt_out_until:
            return True
        return event_id is not None and event_id in self.opt_out_events

    def storm_watch(self, now: float) -> float | None:
        """The storm-watch SoC in force at `now`, or None (none set, or its time has passed)."""
        if self.storm_watch_floor_pct is None or self.storm_watch_until is None or now >= self.storm_watch_until:
            return None
        return self.storm_watch_floor_pct


@dataclass(frozen=True)
class InstallerReset:
    """The only thing that clears LOCKOUT: an installer on site, after inspection."""

    received_at: float


@dataclass(frozen=True)
class Tick:
    """Time passing with no new data: timeouts, ramps and windows are judged on it."""

    received_at: float


@dataclass(frozen=True)
class Stall:
    """The gateway's own execution stopped for `gap_s` (a SIGSTOP, a frozen VM, a starved process).

    The runtime saw its monotonic clock jump that far between two steps. Data that
    went stale meanwhile is the gateway's own doing, not the vehicle's or the
    inverter's: the core holds 0 W and waits for fresh data instead of faulting.
    """

    received_at: float
    gap_s: float


@dataclass(frozen=True)
class CalendarDay:
    """The local calendar date the runtime's wall clock says it is (ISO `YYYY-MM-DD`).

    The core has no wall clock, yet the owner's price budget is per day: the
    runtime says which day it is when it starts and each time the date changes,
    and the core counts price-driven energy per date. `spent_wh` is what the
    journal shows was already spent on price-driven discharge that day (a restart
    must not grant the day's budget twice); the core keeps the larger of it and
    its own count.
    """

    received_at: float
    date: str
    spent_wh: float = 0.0


@dataclass(frozen=True)
class JournalHealth:
    """Whether the journal took the last write. While it does not, no new request is accepted:
    energy the gateway cannot account for must not be promised."""

    received_at: float
    ok: bool
    detail: str = ""


Input = (BmsSnapshot | InverterStatus | DispatchRequest | DispatchCancel | OwnerSettings | InstallerReset | Tick
         | JournalHealth | Stall | SiteLimit | PriceInterval | CalendarDay)


class Verdict(str, Enum):
    ACCEPTED = "accepted"
    CAPPED = "accepted_capped"
    REJECTED = "rejected"


class ReasonCode(str, Enum):
    OPTED_OUT = "OPTED_OUT"
    INSUFFICIENT_ENERGY = "INSUFFICIENT_ENERGY"
    FAULT = "FAULT"
    INVALID = "INVALID"
    DUPLICATE = "DUPLICATE"
    EXPIRED = "EXPIRED"
    OUTAGE = "OUTAGE"
    LOCKOUT = "LOCKOUT"
    NO_DATA = "NO_DATA"
    UNKNOWN_EVENT = "UNKNOWN_EVENT"
    JOURNAL = "JOURNAL_UNAVAILABLE"
    ENTER_SERVICE = "ENTER_SERVICE_DELAY"  # grid back; the inverter's IEEE 1547 enter-service delay runs
    STORM_WATCH = "STORM_WATCH"  # the owner keeps energy for an expected outage (storm watch)
    PRICE_MODE_OFF = "PRICE_MODE_OFF"  # a published price, but the owner has not turned price mode on
    PRICE_KIND = "PRICE_KIND_NOT_FOLLOWED"  # the owner's threshold is for the other kind of price
    BELOW_THRESHOLD = "BELOW_THRESHOLD"  # the price is under the owner's threshold
    BUDGET_SPENT = "DAILY_BUDGET_SPENT"  # the day's price-driven energy has reached the owner's maximum


@dataclass(frozen=True)
class DispatchAnswer:
    """Exactly one per request (and per `PriceInterval`, `request_id` its id): accepted,
    accepted with `cap_w`, or rejected with `reason`."""

    request_id: str
    at: float
    verdict: Verdict
    cap_w: float | None = None
    reason: ReasonCode | None = None
    detail: str = ""

    @classmethod
    def accepted(cls, request_id: str, at: float, detail: str = "") -> "DispatchAnswer":
        return cls(request_id, at, Verdict.ACCEPTED, detail=detail)

    @classmethod
    def capped(cls, request_id: str, at: float, cap_w: float, detail: str = "") -> "DispatchAnswer":
        return cls(request_id, at, Verdict.CAPPED, cap_w=cap_w, detail=detail)

    @classmethod
    def refused(cls, request_id: str, at: float, reason: ReasonCode | None, detail: str) -> "DispatchAnswer":
        return cls(request_id, at, Verdict.REJECTED, reason=reason, detail=detail)


def describe(answer: DispatchAnswer) -> str:
    """The answer in words, the one way logs, reports and SunSpec MnAlrmInfo say it:
    "accepted", "capped to 4200 W: <detail>" or "refused OPTED_OUT: <detail>"."""
    if answer.verdict is Verdict.REJECTED:
        head = f"refused {answer.reason.value}" if answer.reason is not None else "refused"
    elif answer.verdict is Verdict.CAPPED and answer.cap_w is not None:
        head = f"capped to {answer.cap_w:.0f} W"
    else:
        head = "accepted"
    return f"{head}: {answer.detail}" if answer.detail else head


@dataclass(frozen=True)
class Transition:
    at: float
    from_state: Mode
    to_state: Mode
    reason: str


@dataclass(frozen=True)
class FaultRaised:
    at: float
    kind: FaultKind
    detail: str


@dataclass(frozen=True)
class FaultCleared:
    at: float
    kind: FaultKind


@dataclass(frozen=True)
class DispatchEnded:
    """A request stopped applying: its window closed, it was cancelled or superseded."""

    at: float
    request_id: str
    reason: str


@dataclass(frozen=True)
class EventEnergy:
    """Energy delivered for one request so far (`final` once it has ended).

    `meter_wh` is the inverter's TotWhInj delta (what bill credits are paid on);
    `integrated_wh` integrates measured power, the cross-check that catches a
    meter that stalls or jumps.
    """

    at: float
    request_id: str
    meter_wh: float
    integrated_wh: float
    final: bool = False
    meter_total_wh: float | None = None  # the inverter's TotWhInj then: lets a restart bill the gap


@dataclass(frozen=True)
class Resynced:
    """The wait for fresh data after a `Stall` ended: `fresh` when both links delivered, else
    the grace ran out (from then on stale data is a fault like any other)."""

    at: float
    gap_s: float
    waited_s: float
    fresh: bool


@dataclass(frozen=True)
class ServingChanged:
    """The request the inverter works for from now on (None: none), as it changes.

    Of overlapping events only one is served at a time; a statement charges each event the battery's
    wear and peak power only while it was served, and this says when that was (the energy records alone
    come once a minute)."""

    at: float
    request_id: str | None


Event = (DispatchAnswer | Transition | FaultRaised | FaultCleared | DispatchEnded | EventEnergy | Resynced
         | ServingChanged)

NEVER = math.inf
