"""The gateway as one IEEE 1547-2018 DER: what its SunSpec models show, what a 704 write means.

Pure (no sockets, no clock: `now` is passed in) so the meaning of every
register can be tested without a server. `sunspec_server` puts this on Modbus.

- `DerControls` holds the model 704 points this DER implements (active power
  setpoint, the max-power limit and both revert functions) in engineering
  units. `check_write` turns raw registers into point values or a
  `WriteRefused` naming why, before anything changes, so a write is applied
  whole or not at all.
- `Wanted` is what the controls ask of the core right now (a standing setpoint:
  open-ended), and `DerControls.site_limit_w` the site limit `WMaxLimPct` sets for
  every source; `sunspec_server` turns their changes into requests and limits.
- `model_values` builds each model's point values from the core's `Telemetry`,
  the ratings and the controls: the registers are never a second copy of the truth.
  Model 701 says why a setting is not followed now: whatever blocks dispatch at
  the moment (the core's telemetry), else the core's answer, else the site limit.

Points this DER does not implement (power factor, var, ramp, anti-islanding,
the 702 settings, model 1 DA) read as "not implemented" and refuse writes:
accepting a write the gateway would ignore would lie to the energy manager.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from firmware_py.core.telemetry import DerRatings, Telemetry
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchKind,
    Mode,
    Verdict,
    describe,
    is_finite_number,
)
from firmware_py.inverter.sunspec import (
    COMMON,
    DEFAULT_BASE,
    DER_CAPACITY,
    DER_CONTROL_AC,
    DER_MEASURE_AC,
    DER_STORAGE,
    MODELS,
    AlrmBit,
    ConnSt,
    CtrlModesBit,
    InvSt,
    ModelDef,
    SunSpecError,
    SunSpecMap,
    ThrotSrcBit,
    WSetEna,
    WSetMod,
)

CTL = ModelDef.load(DER_CONTROL_AC)

# Engineering values of the 704 points this DER implements, as they start.
CONTROL_DEFAULTS: dict[str, Any] = {
    "WMaxLimPctEna": 0, "WMaxLimPct": 100, "WMaxLimPctRvrt": 100, "WMaxLimPctEnaRvrt": 0,
    "WMaxLimPctRvrtTms": 0, "WSetEna": 0, "WSetMod": WSetMod.WATTS, "WSet": 0, "WSetRvrt": 0,
    "WSetPct": 0, "WSetPctRvrt": 0, "WSetEnaRvrt": 0, "WSetRvrtTms": 0,
}
PCT_POINTS = {"WMaxLimPct": (0, 100), "WMaxLimPctRvrt": (0, 100),
              "WSetPct": (-100, 100), "WSetPctRvrt": (-100, 100)}
WATT_POINTS = ("WSet", "WSetRvrt")
SETPOINT_PCT_POINTS = ("WSetPct", "WSetPctRvrt")  # shares of WMaxRtg
MODES_RUNNING = frozenset({Mode.DISCHARGE, Mode.CHARGE, Mode.BACKUP})
MODES_FAULT = frozenset({Mode.FAULT, Mode.LOCKOUT})


class WriteRefused(Exception):
    """A write the DER will not take; `code` is 'address' or 'value' (the Modbus exception)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def _sf_for(largest: float, capacity: int) -> int:
    """The smallest power of ten that makes `largest` fit a register holding up to `capacity`."""
    sf = 0
    while abs(largest) / 10 ** sf > capacity and sf < 6:
        sf += 1
    return sf


def scale_factors(r: DerRatings) -> dict[int, dict[str, int]]:
    """Fixed per server start: clients read scale factors once, so they must not move."""
    w_sf = _sf_for(max(r.w_max, r.w_cha_max, r.w_discha_max) * 1.1, 32_767)
    return {
        701: {"W_SF": w_sf, "VA_SF": w_sf, "Var_SF": w_sf, "PF_SF": -2, "A_SF": -1, "V_SF": -1,
              "Hz_SF": -2, "TotWh_SF": 0, "TotVarh_SF": 0, "Tmp_SF": 0},
        702: {"W_SF": _sf_for(max(r.w_max, r.w_cha_max, r.w_discha_max), 65_535), "PF_SF": -2,
              "VA_SF": _sf_for(r.w_max, 65_535), "Var_SF": 0, "V_SF": -1, "A_SF": -1, "S_SF": 0},
        704: {"PF_SF": -2, "WMaxLimPct_SF": 0, "WSet_SF": 0, "WSetPct_SF": 0, "VarSet_SF": 0,
              "VarSetPct_SF": 0},
        713: {"WH_SF": _sf_for(r.wh_rtg, 65_535), "Pct_SF": -1},
    }


@dataclass
class RevertTimer:
    """One SunSpec revert function: without a refresh for `tms` s, `value` takes its revert value."""

    enable: str  # the function this timer guards must be enabled (WSetEna / WMaxLimPctEna)
    armed: str
    tms: str
    reverts: Mapping[str, str]  # point -> its revert point
    refreshers: frozenset[str]
    last_refresh: float = 0.0
    reverted: bool = False

    def deadline(self, c: Mapping[str, Any]) -> float | None:
        if c[self.enable] != WSetEna.ENABLED or c[self.armed] != WSetEna.ENABLED or c[self.tms] <= 0 \
                or self.reverted:
            return None
        return self.last_refresh + c[self.tms]

    def remaining(self, c: Mapping[str, Any], now: float) -> int:
        deadline = self.deadline(c)
        return 0 if deadline is None else max(0, math.ceil(deadline - now))


@dataclass(frozen=True)
class Wanted:
    """What the 704 controls ask for now: a standing setpoint, until `WSetEna = 0` or the revert
    function fires at `revert_at` (None: not armed)."""

    kind: DispatchKind
    target_w: float
    revert_at: float | None

    def asks_as(self, other: Wanted) -> bool:
        """The same request of the core (kind and power): a later revert deadline is only a keep-alive."""
        return (self.kind, self.target_w) == (other.kind, other.target_w)


@dataclass
class DerControls:
    """Model 704 as this DER implements it."""

    values: dict[str, Any] = field(default_factory=lambda: dict(CONTROL_DEFAULTS))
    wset_timer: RevertTimer = field(default_factory=lambda: RevertTimer(
        "WSetEna", "WSetEnaRvrt", "WSetRvrtTms", {"WSet": "WSetRvrt", "WSetPct": "WSetPctRvrt"},
        frozenset({"WSet", "WSetPct", "WSetEna", "WSetMod", "WSetEnaRvrt", "WSetRvrtTms"})))
    limit_timer: RevertTimer = field(default_factory=lambda: RevertTimer(
        "WMaxLimPctEna", "WMaxLimPctEnaRvrt", "WMaxLimPctRvrtTms", {"WMaxLimPct": "WMaxLimPctRvrt"},
        frozenset({"WMaxLimPct", "WMaxLimPctEna", "WMaxLimPctEnaRvrt", "WMaxLimPctRvrtTms"})))

    def check_write(self, rel: int, regs: Sequence[int], ratings: DerRatings,
                    sfs: Mapping[str, int]) -> dict[str, Any]:
        """Point values of a write at model offset `rel`, or WriteRefused; changes nothing."""
        points = CTL.points_in(rel, len(regs))
        for p in points:
            if p.offset < rel or p.offset + p.size > rel + len(regs):
                raise WriteRefused("address", f"partial write of {p.name} ({p.size} registers)")
            if p.name not in CONTROL_DEFAULTS:
                why = "read-only" if not p.writable else "not supported by this DER"
                raise WriteRefused("address", f"{p.name} is {why}")
        decoded = CTL.decode(regs, rel, sfs=sfs)
        for p in points:
            _check_value(p.name, decoded[p.name], p.symbols, ratings)
        return {p.name: decoded[p.name] for p in points}

    def apply(self, written: Mapping[str, Any], now: float) -> None:
        self.values.update(written)
        for timer in (self.wset_timer, self.limit_timer):
            if timer.refreshers & written.keys():
                timer.last_refresh, timer.reverted = now, False

    def expire(self, now: float) -> None:
        """Run the revert functions due by `now` (what they change reaches the core as any change of the
        registers does: the server compares what they ask with what the core holds)."""
        for timer in (self.wset_timer, self.limit_timer):
            deadline = timer.deadline(self.values)
            if deadline is not None and now >= deadline:
                for point, revert in timer.reverts.items():
                    self.values[point] = self.values[revert]
                timer.reverted = True

    def wanted(self, ratings: DerRatings) -> Wanted | None:
        """The setpoint asked for, before any limit (the core applies `WMaxLimPct` to every source)."""
        c = self.values
        if c["WSetEna"] != WSetEna.ENABLED:
            return None
        raw = float(c["WSet"]) if c["WSetMod"] == WSetMod.WATTS else float(c["WSetPct"]) / 100 * ratings.w_max
        if abs(raw) < 0.05:  # nothing a request could carry (target_w is sent to 0.1 W)
            return None
        kind = DispatchKind.DISCHARGE if raw > 0 else DispatchKind.CHARGE
        return Wanted(kind, abs(raw), self.wset_timer.deadline(c))

    def site_limit_w(self, ratings: DerRatings) -> float | None:
        """The site limit `WMaxLimPct` sets while enabled (a share of `WMaxRtg`), else None."""
        c = self.values
        if c["WMaxLimPctEna"] != WSetEna.ENABLED:
            return None
        return float(c["WMaxLimPct"]) / 100 * ratings.w_max

    def registers_view(self, now: float) -> dict[str, Any]:
        return {**self.values, "WSetRvrtRem": self.wset_timer.remaining(self.values, now),
                "WMaxLimPctRvrtRem": self.limit_timer.remaining(self.values, now)}


def _check_value(name: str, value: Any, symbols: Mapping[str, int], ratings: DerRatings) -> None:
    if value is None:
        raise WriteRefused("value", f"{name}: the 'not implemented' value cannot be written")
    if symbols and value not in symbols.values():
        raise WriteRefused("value", f"{name}: {value} is not one of {sorted(symbols.values())}")
    if name in PCT_POINTS:
        lo, hi = PCT_POINTS[name]
        if not lo <= value <= hi:
            raise WriteRefused("value", f"{name}: {value} % is outside {lo}..{hi} %")
    if name in WATT_POINTS and abs(value) > ratings.w_max:
        raise WriteRefused("value", f"{name}: {value} W is beyond the rating ±{ratings.w_max:.0f} W")
    if name in WATT_POINTS or name in SETPOINT_PCT_POINTS:
        watts = value if name in WATT_POINTS else value / 100 * ratings.w_max
        if -watts > ratings.w_cha_max:  # as model 702 advertises it (0: the DER cannot charge)
            unit = "W" if name in WATT_POINTS else "%"
            raise WriteRefused("value", f"{name}: {value} {unit} asks a {-watts:.0f} W charge, beyond the charge "
                               f"rating {ratings.w_cha_max:.0f} W")


@dataclass(frozen=True)
class DispatchStatus:
    """How the core answered the setpoint in force, for 701 ThrotPct/ThrotSrc/MnAlrmInfo."""

    wanted: Wanted
    answer: DispatchAnswer | None  # None: the core gave no answer
    request_id: str | None = None  # the request the setting was submitted as (None: not known)

    def allowed_w(self) -> float:
        """What the answer allows (0 when refused or unanswered)."""
        if self.answer is None or self.answer.verdict is Verdict.REJECTED:
            return 0.0
        if self.answer.cap_w is not None:
            return min(self.answer.cap_w, self.wanted.target_w)
        return self.wanted.target_w

    def followed(self, t: Telemetry) -> tuple[float, str | None]:
        """The power the setting is followed at now, and why not in full (None when it is).

        What blocks dispatch now comes first (the gateway starting, a fault, an outage, the
        enter-service delay, the owner's opt-out): it is why the setting is not followed at
        the moment, whatever the answer said when it was given. Then the answer's refusal
        or cap, then the site limit in force (`WMaxLimPct` or the configured one)."""
        if t.refusal is not None:
            return 0.0, f"{t.refusal.value}: {t.refusal_detail}"
        if t.opted_out and self.wanted.kind is DispatchKind.DISCHARGE:
            return 0.0, "OPTED_OUT: the owner has opted out"
        a = self.answer
        if a is None:
            return 0.0, "refused: no answer from the gateway core"
        allowed, limit = self.allowed_w(), self.site_limit_w(t)
        other = self.displaced_by(t)
        if other is not None and allowed > 0:
            return min(self.measured_w(t), allowed), f"another request in force: {other}"
        if self.request_id is not None and t.active_event_id is None and allowed > 0:
            # The core serves nothing (the floor reached, the battery full...): the answer it gave
            # when asked no longer says what is followed now; its mode's reason does.
            why = t.reason or f"gateway in {t.mode.value}"
            return min(self.measured_w(t), allowed), f"not served now: {why}"[:64]
        if limit is not None and limit < allowed:
            return limit, f"site limit {limit:.0f} W"
        return allowed, None if a.verdict is Verdict.ACCEPTED else describe(a)

    def displaced_by(self, t: Telemetry) -> str | None:
        """The request the core serves instead of this setting's, else None.

        The stored answer says what the core allowed when asked; another source's request
        accepted since may have displaced it, and only the telemetry knows (None when the
        core serves nothing: that is not another request in force, `followed` says why)."""
        if self.request_id is None or t.active_event_id in (None, self.request_id):
            return None
        return t.active_event_id

    def measured_w(self, t: Telemetry) -> float:
        """The power flowing now in the setting's direction (0 when it flows the other way):
        what of the setting is followed while another request is served."""
        w = t.power_w if self.wanted.kind is DispatchKind.DISCHARGE else -t.power_w
        return max(0.0, w)

    def site_limit_w(self, t: Telemetry) -> float | None:
        """The site limit in force in the setting's direction (an export limit holds back no charge)."""
        return t.site_limit_w if self.wanted.kind is DispatchKind.DISCHARGE else t.site_charge_limit_w

    def text(self) -> str | None:
        """The answer in words (64 characters) when it does not serve the setpoint in full."""
        a = self.answer
        if a is None:
            return "refused: no answer from the gateway core"
        if a.verdict is Verdict.ACCEPTED:
            return None
        return describe(a)[:64]


def model_values(model_id: int, *, t: Telemetry, r: DerRatings, sfs: Mapping[int, Mapping[str, int]],
                 controls: DerControls, status: DispatchStatus | None, meter: tuple[float, float],
                 unit_id: int, serial: str, version: str, now: float) -> dict[str, Any]:
    """Point values (engineering units, scale factors included) of one model right now."""
    sf = dict(sfs.get(model_id, {}))
    if model_id == COMMON:
        return {"Mn": "powershare-gw", "Md": "truck+inverter DER", "Opt": "bidi", "Vr": version,
                "SN": serial, "DA": unit_id}
    if model_id == DER_MEASURE_AC:
        return {**sf, **_measure(t, r, status, meter)}
    if model_id == DER_CAPACITY:
        modes = 1 << CtrlModesBit.MAX_W | 1 << CtrlModesBit.FIXED_W
        return {**sf, "WMaxRtg": r.w_max, "VAMaxRtg": r.w_max, "WChaRteMaxRtg": r.w_cha_max,
                "WDisChaRteMaxRtg": r.w_discha_max, "VNomRtg": r.v_nom, "NorOpCatRtg": 1, "AbnOpCatRtg": 1,
                "CtrlModes": modes, "IntIslandCatRtg": 1 << 1, "WMax": r.w_max, "WChaRteMax": r.w_cha_max,
                "WDisChaRteMax": r.w_discha_max, "VAMax": r.w_max, "VNom": r.v_nom}
    if model_id == DER_CONTROL_AC:
        return {**sf, **controls.registers_view(now)}
    if model_id == DER_STORAGE:
        known = t.soc_now is not None  # "not implemented" without fresh BMS data, never the last reading
        sta = 2 if t.mode in MODES_FAULT else 0 if known else 1
        return {**sf, "WHRtg": r.wh_rtg, "WHAvail": max(0.0, t.available_wh) if known else None,
                "SoC": t.soc_now, "Sta": sta}
    return {}


def _measure(t: Telemetry, r: DerRatings, status: DispatchStatus | None, meter: tuple[float, float]) -> dict:
    w = t.power_w
    running = t.mode in MODES_RUNNING and w != 0
    inv_st = (InvSt.STARTING if t.mode is Mode.STARTUP else InvSt.FAULT if t.mode in MODES_FAULT
              else InvSt.RUNNING if running else InvSt.STANDBY)
    throt_pct, throt_src, info = 0, 0, None
    if status is not None:
        allowed, info = status.followed(t)
        requested, limit = status.wanted.target_w, status.site_limit_w(t)
        if limit is not None and limit < requested:
            throt_src |= 1 << ThrotSrcBit.MAX_W  # the site limit (WMaxLimPct) holds it back
        if allowed < min(requested, limit if limit is not None else requested):
            throt_src |= 1 << ThrotSrcBit.DERATED  # the gateway holds it back: a refusal, a cap, a block
        if r.w_max > 0:
            throt_pct = round(100 * (requested - allowed) / r.w_max)
        info = info[:64] if info else None
        if running and throt_src:
            inv_st = InvSt.THROTTLED
    alarms = 0
    backup = t.mode is Mode.BACKUP
    if backup:
        alarms |= 1 << AlrmBit.GRID_DISCONNECT
    if t.mode in MODES_FAULT:
        alarms |= 1 << AlrmBit.MANUFACTURER_ALRM
        info = f"gateway in {t.mode.value}"
    return {"ACType": 1, "St": int(running), "InvSt": inv_st, "ConnSt": ConnSt.DISCONNECTED if backup else ConnSt.CONNECTED,
            "Alrm": alarms, "DERMode": 1 << (1 if backup else 0), "W": w, "VA": abs(w),
            "TotWhInj": int(meter[0]), "TotWhAbs": int(meter[1]), "ThrotPct": max(0, min(100, throt_pct)),
            "ThrotSrc": throt_src, "MnAlrmInfo": info}


def encode_safely(mdef: ModelDef, values: Mapping[str, Any]) -> list[int]:
    """The model's registers; a value that is not finite or does not fit reads "not implemented"."""
    clean = {k: (None if isinstance(v, float) and not is_finite_number(v) else v) for k, v in values.items()}
    try:
        return mdef.encode(clean)
    except (SunSpecError, OverflowError, ValueError):
        pass
    for name in list(clean):
        try:
            sfs = {n: clean.get(n, 0) for n, p in mdef.points.items() if p.type == "sunssf"}
            mdef.encode_point(name, clean[name], sfs)
        except (SunSpecError, OverflowError, ValueError, KeyError):
            clean[name] = None
    return mdef.encode(clean)


def layout(base: int = DEFAULT_BASE) -> SunSpecMap:
    """The map's shape (addresses only): values are filled in on every read."""
    sunspec = SunSpecMap(base)
    for model_id in MODELS:
        sunspec.add(model_id, {})
    return sunspec
