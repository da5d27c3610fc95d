"""What the core remembers between steps, and the one result a step returns.

Kept apart from the machine so the modules that answer requests, account
energy and build telemetry can read the controller without importing the step
(and the step can import them): every module here imports downward only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from firmware_py.core import floor as floors
from firmware_py.core.faults import FaultBook, bms_usable, inverter_usable
from firmware_py.core.policy import Policy
from firmware_py.core.requests import RequestBook
from firmware_py.core.types import (
    BmsSnapshot,
    DispatchAnswer,
    Event,
    InverterCommand,
    InverterStatus,
    JournalHealth,
    Mode,
    OwnerSettings,
    SiteLimit,
    is_finite_number,
)


@dataclass(frozen=True)
class Controller:
    """Everything the core remembers between steps (frozen: a step returns a new one)."""

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
    reason: str = "starting: waiting for BMS and inverter data"  # why the setpoint is what it is
    mode_reason: str = "starting: waiting for BMS and inverter data"
    """Why the mode is what it is: what a mode that commands nothing says for as long as it lasts. Kept apart
    from `reason`, which the clamp may override for a while (a resync), so an override ends with its cause."""
    serving_id: str | None = None
    last_step_at: float | None = None
    peak_since_bms_w: float = 0.0  # highest discharge commanded since the newest BMS snapshot
    journal: JournalHealth | None = None  # None: no report yet, taken as working
    resync_since: float | None = None  # a `Stall` was seen then: 0 W until fresh data (or the grace ends)
    stall_gap_s: float = 0.0  # how long that stall was
    site_limits: tuple[SiteLimit, ...] = ()  # one per source that set one (a site controller's WMaxLimPct)
    day: str | None = None  # the local date the runtime last said it is (`CalendarDay`)
    price_day_wh: float = 0.0  # price-driven energy out that day: what the owner's daily maximum caps
    peak_since_inverter_w: float = 0.0  # highest discharge commanded since the newest good inverter reading
    commanded_wh: float = 0.0  # discharge energy the commands allowed, all told, up to the last step
    metered_commanded_wh: float = 0.0  # that total at the newest good inverter reading (`energy.commanded_wh`)
    metered: InverterStatus | None = None  # the newest good reading: energy is accounted between good ones
    meter_moved_at: float | None = None  # the good reading at which the meter's counters last changed
    meter_moved_commanded_wh: float = 0.0  # `commanded_wh`'s total at that reading
    metered_serving: str | None = None  # the request served at that reading (a link lost mid-event stops it)

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

    def site_limit_w(self, discharge: bool = True) -> float:
        """The site limit in force for one direction: the configured maximum, lowered by every
        source's `SiteLimit` (a site controller's WMaxLimPct caps every source's requests; an
        export limit only discharge)."""
        configured = self.policy.max_discharge_w if discharge else self.policy.max_charge_w
        return min([configured, *(s.limit_w for s in self.site_limits
                                  if s.limit_w is not None and (discharge or not s.export_only))])

    def with_site_limit(self, limit: SiteLimit) -> "Controller":
        """`limit` replaces the one its source set before (a negative or non-finite limit counts as 0 W)."""
        value = limit.limit_w
        if value is not None and not (is_finite_number(value) and value >= 0):
            value = 0.0  # the safe reading of a nonsense limit
        kept = tuple(s for s in self.site_limits if s.source != limit.source)
        return self.evolve(site_limits=kept if value is None else (*kept, replace(limit, limit_w=value)))

    @property
    def resyncing(self) -> bool:
        """Waiting for fresh data after the gateway's own stall."""
        return self.resync_since is not None

    def journal_failing(self) -> bool:
        return self.journal is not None and not self.journal.ok

    def evolve(self, **changes: Any) -> "Controller":
        """`dataclasses.replace(self, **changes)`, without `replace`'s per-call cost.

        A step evolves the controller three to five times and the bench steps it
        about 200,000 times a run: `replace` walks every field and the frozen
        `__init__` sets each through `object.__setattr__`, a fifth of a step. A
        Controller is exactly its fields (no `__post_init__`, no derived or cached
        attributes; a test holds it to that), so copying them and applying the
        changes builds the same object, still frozen.
        """
        if not _FIELDS.issuperset(changes):
            raise TypeError(f"Controller has no field {sorted(changes.keys() - _FIELDS)[0]!r}")
        new = object.__new__(Controller)
        new.__dict__.update(self.__dict__, **changes)
        return new


_FIELDS = frozenset(f.name for f in fields(Controller))


@dataclass(frozen=True)
class StepResult:
    controller: Controller
    command: InverterCommand
    events: list[Event]
    step_again_at: float | None = None
    """When the core wants its next step, if sooner than the adapter's own cadence would bring it:
    the core keeps no timers, so it says when time passing will change its answer."""

    def answer_for(self, request_id: str) -> DispatchAnswer | None:
        return next((e for e in self.events if isinstance(e, DispatchAnswer) and e.request_id == request_id), None)
