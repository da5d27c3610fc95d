"""The read model: what aggregators, the owner and SunSpec readers may see of the gateway now.

Built only from the controller, so every reader sees the state the core decides
on, never a second copy kept beside it (the command's setpoint is the
controller's `setpoint_w`). Ages, not timestamps, for the links: a reader
should not need the gateway clock to tell that the BMS went quiet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from firmware_py.core import floor as floors
from firmware_py.core.answers import improvable, refusal
from firmware_py.core.controller import Controller
from firmware_py.core.faults import Latch, bms_usable, inverter_usable
from firmware_py.core.policy import Policy
from firmware_py.core.requests import Booked
from firmware_py.core.types import DispatchKind, FaultKind, InverterStatus, Mode, ReasonCode, Verdict


@dataclass(frozen=True)
class DerRatings:
    """The gateway's nameplate as one DER: the smaller of the inverter's and the gateway's limits."""

    w_max: float
    w_cha_max: float
    w_discha_max: float
    wh_rtg: float
    v_nom: float = 240.0

    @classmethod
    def of(cls, policy: Policy, inverter: InverterStatus | None) -> DerRatings:
        """The DER as an aggregator may use it: the gateway's limits, lowered by the inverter's
        ratings once it has reported them. A `WMaxRtg` of 0 is "not reported"; a `WChaRteMaxRtg`
        of 0 is "cannot charge" and a `WDisChaRteMaxRtg` of 0 "cannot discharge", as the core reads them
        (`can_charge`, `discharge_rating_w`), so the DER does not advertise what the core would refuse."""

        def lower(limit: float, rating: float) -> float:
            return min(limit, rating) if rating > 0 else limit

        inv = inverter if inverter is not None and inverter.comms_ok else None
        if inv is None:
            return cls(w_max=max(policy.max_discharge_w, policy.max_charge_w), wh_rtg=policy.usable_capacity_wh,
                       w_cha_max=policy.max_charge_w, w_discha_max=policy.max_discharge_w)
        return cls(w_max=lower(max(policy.max_discharge_w, policy.max_charge_w), inv.w_max_rtg),
                   wh_rtg=policy.usable_capacity_wh, w_cha_max=max(0.0, min(policy.max_charge_w, inv.charge_rating_w())),
                   w_discha_max=max(0.0, min(policy.max_discharge_w, inv.discharge_rating_w())))


@dataclass(frozen=True)
class LatchView:
    """A latched fault as an installer reads it: since when, why, and how long the hold-off still runs.

    `clears_in_s` is None while the condition is present (the hold-off has not started).
    """

    kind: FaultKind
    raised_at: float
    detail: str
    clears_in_s: float | None


@dataclass(frozen=True)
class Telemetry:
    """The gateway at `at`. None = not known (no data yet)."""

    at: float
    mode: Mode
    soc_pct: float | None  # the conservative SoC (SoC min) the reserve is judged on
    floor_pct: float
    power_w: float  # measured at the inverter; + discharge, 0 without inverter data or once a poll failed
    setpoint_w: float
    available_wh: float  # above the floor
    active_event_id: str | None
    reason: str = ""
    faults: tuple[FaultKind, ...] = ()  # latched faults, and LOCKOUT while locked out
    reserve_pct: float | None = None  # the owner's reserve
    verdict: Verdict | None = None  # the serving event's answer
    cap_w: float | None = None
    meter_wh: float | None = None  # the serving event's billed energy so far
    bms_age_s: float | None = None  # now - the newest BMS snapshot's received_at
    inverter_age_s: float | None = None
    bms_fresh: bool = False  # the BMS data is fresh enough to act on: `soc_pct` is a reading of now
    inverter_fresh: bool = False  # the inverter's, likewise: `power_w` is a reading of now
    journal_ok: bool = True
    ratings: DerRatings | None = None  # what the gateway offers as one DER
    inverter_meters_wh: tuple[float, float] | None = None  # the inverter's lifetime (TotWhInj, TotWhAbs)
    resyncing: bool = False  # holding 0 W after the gateway's own stall, until fresh data
    last_power_w: float = 0.0  # the newest good reading's power: what people are shown, with `inverter_fresh`
    storm_watch_pct: float | None = None  # the storm watch's SoC while it lasts
    storm_watch_until: float | None = None  # its end, on the core's clock
    latches: tuple[LatchView, ...] = ()  # every latched fault with its hold-off
    lockout_count: int = 0  # faults counted toward the lockout within its window
    refusal: ReasonCode | None = None  # why any new request would be refused now (None: the gateway can serve)
    refusal_detail: str = ""
    opted_out: bool = False  # the owner is opted out of discharge now (not counting per-event opt-outs)
    improvable: tuple[str, ...] = ()  # refused or capped requests a new revision would now serve better
    site_limit_w: float | None = None  # the discharge site limit in force (config, lowered by site controllers)
    site_charge_limit_w: float | None = None  # the charge one (an export limit does not lower it)
    envelope_in_s: float | None = None  # the serving discharge: when the floor's envelope starts to cut it (0: now)
    price_threshold_per_kwh: float | None = None  # price-responsive mode's threshold (None: the mode is off)
    price_kind: str | None = None  # which published price it follows
    price_max_wh_per_day: float = 0.0
    price_day_wh: float = 0.0  # price-driven energy out today (the day the runtime last gave)

    @property
    def soc_now(self) -> float | None:
        """The SoC as a reading of now, for those who report it onward (aggregators, a site controller):
        None without fresh BMS data, when `soc_pct` is only the last one the BMS sent."""
        return self.soc_pct if self.bms_fresh else None

    @property
    def shown_power_w(self) -> float:
        """The power people are shown (status, metrics): the reading of now while the inverter's data is fresh,
        else the last good one, which `inverter_fresh` marks as such. Not `power_w`'s 0 W after a failed poll:
        never read, and the inverter may run on until its revert."""
        return self.power_w if self.inverter_fresh else self.last_power_w

    @property
    def available_wh_now(self) -> float | None:
        """The energy above the floor as a reading of now: None without fresh BMS data, when the core's
        `available_wh` is 0 for "nothing to act on", not for an empty pack."""
        return self.available_wh if self.bms_fresh else None


def telemetry(c: Controller, now: float) -> Telemetry:
    """The controller as readers see it at `now`."""
    serving = c.book.find(c.serving_id) if c.serving_id else None
    faults = c.faults.kinds + ((FaultKind.LOCKOUT,) if c.faults.locked_out else ())
    power = c.inverter.measured_w if c.inverter is not None and c.inverter.comms_ok else 0.0
    return Telemetry(
        at=now, mode=c.mode, soc_pct=c.bms.soc_min_pct if c.bms is not None else None,
        floor_pct=c.floor_pct(now), power_w=power, setpoint_w=c.setpoint_w, available_wh=c.available_wh(now),
        last_power_w=c.metered.measured_w if c.metered is not None else 0.0,
        active_event_id=serving.request.id if serving else None, reason=c.reason, faults=faults,
        reserve_pct=c.owner.reserve_pct,
        verdict=serving.answer.verdict if serving else None, cap_w=serving.answer.cap_w if serving else None,
        meter_wh=round(serving.meter_wh, 3) if serving else None,
        bms_age_s=now - c.bms.received_at if c.bms is not None else None,
        inverter_age_s=now - c.inverter.received_at if c.inverter is not None else None,
        bms_fresh=bms_usable(c.bms, now, c.policy), inverter_fresh=inverter_usable(c.inverter, now, c.policy),
        journal_ok=not c.journal_failing(),
        # The newest good reading's too: a failed poll reports no ratings, and the policy's own limits in their
        # place made the DER advertise (and take writes for) power the inverter lacks at every link blip.
        ratings=DerRatings.of(c.policy, c.metered),
        # The newest good reading's: a failed read carries no counters, and 0 would read as a meter reset.
        inverter_meters_wh=(c.metered.tot_wh_inj, c.metered.tot_wh_abs) if c.metered is not None else None,
        resyncing=c.resyncing,
        storm_watch_pct=c.owner.storm_watch(now),
        storm_watch_until=c.owner.storm_watch_until if c.owner.storm_watch(now) is not None else None,
        latches=tuple(_latch(latch, now, c.policy) for latch in c.faults.latches),
        price_threshold_per_kwh=c.owner.price_threshold_per_kwh if c.owner.price_mode else None,
        price_kind=c.owner.price_kind.value if c.owner.price_mode else None,
        price_max_wh_per_day=c.owner.price_max_wh_per_day,
        price_day_wh=round(c.price_day_wh, 3),
        lockout_count=len(c.faults.raised_times),
        **_dispatch_view(c, now, serving),
    )


def _latch(latch: Latch, now: float, policy: Policy) -> LatchView:
    clears_in = None if latch.gone_since is None else max(0.0, policy.fault_holdoff_s - (now - latch.gone_since))
    return LatchView(latch.kind, latch.raised_at, latch.detail, clears_in)


def _dispatch_view(c: Controller, now: float, serving: Booked | None) -> dict[str, Any]:
    """What blocks or caps dispatch now, and what would be served better if asked again."""
    refused = refusal(c, now)
    return {"refusal": refused[0] if refused else None, "refusal_detail": refused[1] if refused else "",
            "opted_out": c.owner.opted_out(now), "improvable": tuple(sorted(improvable(c, now))),
            "site_limit_w": c.site_limit_w(discharge=True), "site_charge_limit_w": c.site_limit_w(discharge=False),
            "envelope_in_s": _envelope_in_s(c, now, serving)}


def _envelope_in_s(c: Controller, now: float, serving: Booked | None) -> float | None:
    """Seconds until the floor's envelope starts to reduce the serving discharge, at the power it runs at.

    The envelope takes over when the energy above the floor falls to max(P²/2r, P·horizon):
    from then on power ramps down so SoC min meets the floor, never crosses it."""
    if serving is None or serving.request.kind is not DispatchKind.DISCHARGE or c.mode is not Mode.DISCHARGE:
        return None
    power = min(serving.target_w, c.site_limit_w(discharge=True))
    if power <= 0:
        return None
    above = c.available_wh(now) - floors.envelope_takes_over_wh(c.policy, power)
    return max(0.0, above / power * 3600)
