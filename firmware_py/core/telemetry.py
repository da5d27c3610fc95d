"""The read model: what aggregators, the owner and SunSpec readers may see of the gateway now.

Built only from the controller, so every reader sees the state the core decides
on, never a second copy kept beside it (the command's setpoint is the
controller's `setpoint_w`). Ages, not timestamps, for the links: a reader
should not need the gateway clock to tell that the BMS went quiet.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware_py.core.controller import Controller
from firmware_py.core.policy import Policy
from firmware_py.core.types import FaultKind, InverterStatus, Mode, Verdict


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
        ratings once it has reported them (0 means "not reported yet")."""

        def lower(limit: float, rating: float) -> float:
            return min(limit, rating) if rating > 0 else limit

        inv = inverter if inverter is not None and inverter.comms_ok else None
        w_max = lower(max(policy.max_discharge_w, policy.max_charge_w), inv.w_max_rtg if inv else 0.0)
        return cls(w_max=w_max, wh_rtg=policy.usable_capacity_wh,
                   w_cha_max=min(w_max, lower(policy.max_charge_w, inv.w_cha_max_rtg if inv else 0.0)),
                   w_discha_max=min(w_max, lower(policy.max_discharge_w, inv.w_discha_max_rtg if inv else 0.0)))


@dataclass(frozen=True)
class Telemetry:
    """The gateway at `at`. None = not known (no data yet)."""

    at: float
    mode: Mode
    soc_pct: float | None  # the conservative SoC (SoC min) the reserve is judged on
    floor_pct: float
    power_w: float  # measured at the inverter; + discharge, 0 without inverter data
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
    journal_ok: bool = True
    ratings: DerRatings | None = None  # what the gateway offers as one DER
    inverter_meters_wh: tuple[float, float] | None = None  # the inverter's lifetime (TotWhInj, TotWhAbs)
    resyncing: bool = False  # holding 0 W after the gateway's own stall, until fresh data


def telemetry(c: Controller, now: float) -> Telemetry:
    """The controller as readers see it at `now`."""
    serving = c.book.find(c.serving_id) if c.serving_id else None
    faults = c.faults.kinds + ((FaultKind.LOCKOUT,) if c.faults.locked_out else ())
    power = c.inverter.measured_w if c.inverter is not None and c.inverter.comms_ok else 0.0
    return Telemetry(
        at=now, mode=c.mode, soc_pct=c.bms.soc_min_pct if c.bms is not None else None,
        floor_pct=c.floor_pct(now), power_w=power, setpoint_w=c.setpoint_w, available_wh=c.available_wh(now),
        active_event_id=serving.request.id if serving else None, reason=c.reason, faults=faults,
        reserve_pct=c.owner.reserve_pct,
        verdict=serving.answer.verdict if serving else None, cap_w=serving.answer.cap_w if serving else None,
        meter_wh=round(serving.meter_wh, 3) if serving else None,
        bms_age_s=now - c.bms.received_at if c.bms is not None else None,
        inverter_age_s=now - c.inverter.received_at if c.inverter is not None else None,
        journal_ok=not c.journal_failing(),
        ratings=DerRatings.of(c.policy, c.inverter),
        inverter_meters_wh=(c.inverter.tot_wh_inj, c.inverter.tot_wh_abs) if c.inverter is not None else None,
        resyncing=c.resyncing,
    )
