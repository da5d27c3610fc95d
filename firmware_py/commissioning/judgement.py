"""What commissioning concludes from what it observed: pure functions, no I/O, no clock.

Each step's observation is a frozen record the probes fill in (`probes.py`); each
`judge_*` turns one into checks. A failed check says what was seen and what to look
at (wiring, termination, bitrate, DBC, unit id, address...), because the person
reading it is on site with a multimeter, not at a desk with the source.

The thresholds are deliberately coarse: a period within ±50 % of the DBC's, a sign
test judged on the second half of its window against half the expected change.
They tell a working installation from a miswired one; they are not a calibration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from statistics import fmean
from typing import Any

from firmware_py.commissioning.report import Check, Step, failed, interrupted, passed, skipped
from firmware_py.core.types import (
    CLOSED_PACK_CONTACTORS,
    ENERGY_BMS_STATES,
    FAULT_BMS_STATES,
    BmsState,
    ContactorState,
    InverterState,
    PackContactor,
    ReasonCode,
    nameplate_discharge_w,
)

PERIOD_TOLERANCE = 0.5
"""A message's measured period may differ from its DBC period by this share (the issue's ±50 %)."""
TOLERATED_REFUSALS = frozenset({"unknown_mux_page"})
"""Refusals that say nothing against the DBC: a real BMS sends multiplexer pages a DBC need not know
(when some of a message's frames decode; when none does, they are the reason and shown as such)."""
EXTENDED_ID = 0x8000_0000
"""Set on a foreign id seen in a 29-bit (extended) frame (Linux's CAN_EFF_FLAG): 29-bit 0x132 is another
message than 11-bit 0x132, and a BMS whose ids arrive as 29-bit frames must not read as 'none of them seen'."""
EXTENDED_MASK = 0x1FFF_FFFF
MAX_REFUSED_SHARE = 0.01
"""More refused BMS frames than this share means a DBC that does not fit (or a bus corrupting frames)."""
SOC_SLACK_PCT = 0.5
ENERGY_SOC_SLACK_PCT = 10.0
"""Nominal remaining / nominal full pack may differ from the average SoC by this much (estimators differ)."""
CAPACITY_RATIO = (0.6, 1.5)
"""The BMS's nominal full pack over the configured usable capacity: outside, one of them is wrong."""
SIGN_SHARE = 0.5
"""The sign test wants at least half the commanded power measured, and half the expected current change."""
MIN_CURRENT_STEP_A = 0.1
"""The smallest current change believed (the usual BMS current resolution)."""
NO_ANSWER = "no answer"
"""The sign test's answer in words when the core gave none."""
MAX_OVER_COMMAND = 1.5
"""The test's measured power may exceed the command by this factor (plus ZERO_W): beyond, the reading is wrong."""
ZERO_W = 50.0
"""Below this the inverter is taken to be at 0 W after the test (meters read a little noise)."""
PACK_TO_AC_RATIO = (0.7, 1.45)
"""Power out of the pack (BMS volts x amps) over the inverter's AC power in the test: losses put it a
little above 1, the current's resolution moves it a little; a DBC scaling the pack's voltage or current
for another vehicle puts it near 0.5 or 2."""

CAN_WIRING = ("the truck is awake and its BMS talking (Powershare on), CAN-H/CAN-L wiring and the connector, "
              "termination (120 ohm at each end of the bus: about 60 ohm across CAN-H and CAN-L with power off), "
              "the bitrate ([can] bitrate, e.g. `ip -details link show can0`), and [can] interface and channel")


# ---------------------------------------------------------------------------------------------- config

def judge_config(source: str, problems: Sequence[str]) -> list[Check]:
    """The configuration as `run` checks it before opening anything (`assembly.check`)."""
    if not problems:
        return [passed(Step.CONFIG, "configuration", f"{source}: valid (as `check-config` and `run` judge it)")]
    return [failed(Step.CONFIG, "configuration", problem, "fix the key named, then run again "
                   "(`powershare-gw check-config FILE` lists every problem)") for problem in problems]


def judge_listeners(taken: Sequence[tuple[str, str, str]]) -> list[Check]:
    """The addresses `run` listens on (the web app, metrics, the OpenADR 3 callback): one another program
    holds would stop the service at its start, after a commissioning that passed."""
    step = Step.CONFIG
    if not taken:
        return [passed(step, "listen addresses", "every address the gateway listens on is free")]
    return [failed(step, f"{key} ({address})", f"cannot listen there: {why}; `run` would exit at its start",
                   "stop the program that holds it (`sudo ss -ltnp` lists each listening port's process), or "
                   f"give {key} another port") for key, address, why in taken]


# ---------------------------------------------------------------------------------------------- CAN

@dataclass(frozen=True)
class MessageSpec:
    """A BMS message as the DBC describes it."""

    name: str
    frame_id: int
    period_s: float
    pages: int = 1  # multiplexer pages the DBC knows (1: not multiplexed)

    @property
    def label(self) -> str:
        return f"{self.name} (0x{self.frame_id:03X})"


@dataclass(frozen=True)
class Timing:
    """How often something was seen: count, and the receive times of the first and last."""

    count: int
    first: float
    last: float

    @property
    def interval_s(self) -> float | None:
        """The mean time between two of them (None with fewer than two)."""
        return (self.last - self.first) / (self.count - 1) if self.count >= 2 else None

    def seen(self, at: float) -> Timing:
        return Timing(self.count + 1, self.first, at)


@dataclass(frozen=True)
class CanObservation:
    """What the bus carried during the observation window, and what the gateway's reader made of it."""

    where: str  # "socketcan can0"
    dbc: str  # the DBC's file name
    window_s: float
    frames: int = 0  # every frame, of any id
    foreign_ids: tuple[int, ...] = ()  # ids seen that the DBC does not describe (a few); 29-bit ones | EXTENDED_ID
    by_id: Mapping[int, Timing] = field(default_factory=dict)  # DBC ids, every page together
    by_page: Mapping[tuple[int, int], Timing] = field(default_factory=dict)  # multiplexed DBC ids, per page
    accepted: Mapping[int, int] = field(default_factory=dict)  # DBC id -> frames the reader believed
    refused: Mapping[int, Mapping[str, int]] = field(default_factory=dict)  # DBC id -> reason -> count
    last_refusal: str = ""
    values: Mapping[str, Any] = field(default_factory=dict)  # the reader's snapshot at the end
    stale: frozenset[str] = frozenset()  # past their timeout by more than LATE_S at the end, or refused since
    mapped: tuple[str, ...] = ()  # the snapshot fields the configuration maps to a signal
    usable_capacity_wh: float = 0.0
    open_error: str = ""  # the bus could not be opened, or failed during the window
    ended_at: float | None = None  # the window's end (or the stop), on the clock of the Timings' first and last


def judge_can(obs: CanObservation, specs: Sequence[MessageSpec]) -> list[Check]:
    """Traffic, then every DBC message at its period, then the values and the contactor/BMS state."""
    step = Step.CAN
    if obs.open_error:
        return [failed(step, "bus", obs.open_error, f"that the interface exists and is up (`ip link show`), "
                       f"then {CAN_WIRING}")]
    if obs.frames == 0:
        return [failed(step, "traffic", f"no CAN traffic on {obs.where} in {obs.window_s:g} s", CAN_WIRING)]
    ids = len(obs.by_id) + len(obs.foreign_ids)
    checks = [passed(step, "traffic", f"{obs.frames} frames in {obs.window_s:g} s on {obs.where} "
                     f"({obs.frames / obs.window_s:.0f} frames/s, {ids} ids)")]
    if not obs.by_id:
        detail = (f"none of its {len(specs)} messages ({_ids(s.frame_id for s in specs)}) on the bus, which carries "
                  f"{_ids(obs.foreign_ids)}")
        advice = ("the DBC is for another vehicle ([vehicle] dbc), or the gateway is on another CAN bus of the "
                  "vehicle than the one the BMS talks on")
        if extended := [s.frame_id for s in specs if _extended_only(obs, s.frame_id)]:
            detail += f"; {_as_extended(extended)}"
            advice = EXTENDED_ADVICE
        checks.append(failed(step, f"BMS messages of {obs.dbc}", detail, advice))
        return checks
    checks += [_judge_message(obs, spec) for spec in specs]
    checks.append(_judge_refusals(obs))
    checks.append(_judge_values(obs))
    checks.append(_judge_states(obs))
    return checks


EXTENDED_ADVICE = ("check the vehicle's CAN profile / DBC: the gateway reads the BMS's ids as 11-bit frames, as "
                   "the DBC defines them ([vehicle] dbc), so the vehicle (or a gateway between) must send them so")


def _extended_only(obs: CanObservation, frame_id: int) -> bool:
    """A DBC id seen as a 29-bit frame and never as the 11-bit one the DBC defines: the reader ignores
    those frames, and saying only 'not seen' would send the installer after the wiring or the DBC's ids."""
    return frame_id not in obs.by_id and (frame_id | EXTENDED_ID) in obs.foreign_ids


def _as_extended(frame_ids: Sequence[int]) -> str:
    one = len(frame_ids) == 1
    return (f"{_ids(frame_ids)} arrive{'s' if one else ''} as {'a ' if one else ''}29-bit (extended) "
            f"frame{'' if one else 's'}; the DBC defines {'it' if one else 'them'} as 11-bit")


def _id(frame_id: int) -> str:
    """An 11-bit id in 3 hex digits, a 29-bit one (`EXTENDED_ID` set) in 8 and said so: the same number
    in both forms must not read as the same message."""
    if frame_id & EXTENDED_ID:
        return f"0x{frame_id & EXTENDED_MASK:08X} (29-bit)"
    return f"0x{frame_id:03X}"


def _ids(ids: Sequence[int] | Any) -> str:
    shown = [_id(i) for i in sorted(ids)]
    return ", ".join(shown[:12]) + (f" and {len(shown) - 12} more" if len(shown) > 12 else "") if shown else "nothing"


def _judge_message(obs: CanObservation, spec: MessageSpec) -> Check:
    step, name = Step.CAN, spec.label
    want = f"{spec.period_s * 1e3:g} ms"
    timing = obs.by_id.get(spec.frame_id)
    if timing is None:
        if _extended_only(obs, spec.frame_id):
            return failed(step, name, f"not seen as an 11-bit frame in {obs.window_s:g} s: "
                          f"{_as_extended([spec.frame_id])}", EXTENDED_ADVICE)
        return failed(step, name, f"not seen in {obs.window_s:g} s (the DBC says every {want})",
                      "a DBC for another vehicle or model year ([vehicle] dbc), or the message is on another bus")
    if not obs.accepted.get(spec.frame_id):  # every refusal is the reason now, tolerated ones too
        refused = dict(obs.refused.get(spec.frame_id, {}))
        advice = "the DBC's layout does not fit this vehicle's frames ([vehicle] dbc)"
        if refused and set(refused) <= TOLERATED_REFUSALS:
            advice = ("every frame carries a multiplexer page the DBC does not define: a DBC for another vehicle "
                      "or model year ([vehicle] dbc), or a BMS not sending real data yet (frames all 0xFF: "
                      "wake the truck, Powershare on)")
        return failed(step, name, f"{timing.count} frames, none decodable ({_reasons(refused)})", advice)
    measured = _period(obs, spec)
    if measured is None:
        return failed(step, name, f"seen {timing.count} time(s) in {obs.window_s:g} s: too few to measure its "
                      f"period ({want})", "observe longer (--can-seconds)")
    if abs(measured - spec.period_s) > PERIOD_TOLERANCE * spec.period_s:
        return failed(step, name, f"every {measured * 1e3:.0f} ms, the DBC says {want} (±50 %)",
                      "another message with this id (a DBC for another vehicle), or a bus losing frames: "
                      "termination, bus load, error counters (`ip -statistics link show can0`)")
    silent_s = None if obs.ended_at is None else obs.ended_at - timing.last
    if silent_s is not None and silent_s > SILENT_PERIODS * spec.period_s + LATE_S:  # the mean gap hides a stop
        return failed(step, name, f"stopped: {timing.count} frame(s), then silent for the last {silent_s:.1f} s of "
                      f"the window (the DBC says every {want})",
                      "a BMS (or a gateway on the bus) that stops sending part-way: wiring, a loose connector, the "
                      "vehicle going to sleep, or a bus losing frames (`ip -statistics link show can0`)")
    return passed(step, name, f"every {measured * 1e3:.0f} ms (DBC: {want})")


SILENT_PERIODS = 1.5
LATE_S = 0.25
"""A message whose last frame came more than `SILENT_PERIODS` periods and `LATE_S` before the window's end has
stopped. `LATE_S` is the lateness a frame may have without the message having stopped: a sender's and the
listener's scheduling on a loaded gateway, frames on their way as the window closes (a 10 ms message's last
frame 20 ms before the end, on a bench under load, failed a healthy bus as stopped)."""


def _period(obs: CanObservation, spec: MessageSpec) -> float | None:
    """The measured period closest to the DBC's.

    A multiplexed message's pages may come all together each period (the simulator,
    some vehicles) or one per period in turn (others): per page the first pattern
    shows the period, per id the second does. Either matches the DBC.
    """
    candidates = [obs.by_id[spec.frame_id].interval_s]
    candidates += [t.interval_s for (fid, _), t in obs.by_page.items() if fid == spec.frame_id]
    known = [c for c in candidates if c is not None]
    return min(known, key=lambda c: abs(c - spec.period_s)) if known else None


def _reasons(counts: Mapping[str, int]) -> str:
    """Each reason with its count, most first; 'no reason recorded' rather than 'none', which read as
    'no problem' beside 'none decodable'."""
    return (", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            or "no reason recorded")


def _judge_refusals(obs: CanObservation) -> Check:
    refused: dict[str, int] = {}
    for counts in obs.refused.values():
        for reason, n in counts.items():
            if reason not in TOLERATED_REFUSALS:
                refused[reason] = refused.get(reason, 0) + n
    total = sum(obs.accepted.values()) + sum(refused.values())
    bad = sum(refused.values())
    if total and bad / total > MAX_REFUSED_SHARE:
        return failed(Step.CAN, "decoded frames", f"{bad} of {total} BMS frames refused ({_reasons(refused)}); "
                      f"last: {obs.last_refusal}", "a DBC whose layout does not fit this vehicle ([vehicle] dbc, "
                      "[vehicle.signals]), or frames corrupted on the bus (termination, a loose connector)")
    return passed(Step.CAN, "decoded frames", f"{total - bad} of {total} BMS frames believed"
                  + (f" ({_reasons(refused)} refused)" if bad else ""))


def _judge_values(obs: CanObservation) -> Check:
    """Every mapped value believed at the end of the window, and the values agreeing with each other."""
    step, v = Step.CAN, obs.values
    missing = [f for f in obs.mapped if v.get(f) is None or f in obs.stale]
    if missing:
        return failed(step, "values", f"not believed at the end of the window: {', '.join(missing)}",
                      "the messages above that carry them; [vehicle.signals] maps each field to 'MESSAGE.SIGNAL'")
    problems = []
    socs = [v.get(f) for f in ("soc_min_pct", "soc_avg_pct", "soc_max_pct")]
    if None not in socs and not socs[0] - SOC_SLACK_PCT <= socs[1] <= socs[2] + SOC_SLACK_PCT:
        problems.append(f"SoC min {socs[0]:g} %, avg {socs[1]:g} %, max {socs[2]:g} % are not in order")
    full, remaining = v.get("nominal_full_wh"), v.get("nominal_remaining_wh")
    if full and remaining is not None and socs[1] is not None \
            and abs(100 * remaining / full - socs[1]) > ENERGY_SOC_SLACK_PCT:
        problems.append(f"nominal remaining {remaining / 1e3:.1f} of {full / 1e3:.1f} kWh is "
                        f"{100 * remaining / full:.0f} %, but the average SoC is {socs[1]:g} %")
    if full and obs.usable_capacity_wh and not CAPACITY_RATIO[0] <= full / obs.usable_capacity_wh <= CAPACITY_RATIO[1]:
        problems.append(f"the BMS's full pack is {full / 1e3:.1f} kWh but [vehicle] usable_capacity_wh is "
                        f"{obs.usable_capacity_wh / 1e3:.1f} kWh")
    for low, high, what in (("min_temp_c", "max_temp_c", "pack temperature"), ("brick_v_min", "brick_v_max",
                                                                                 "brick voltage")):
        if v.get(low) is not None and v.get(high) is not None and v[low] > v[high]:
            problems.append(f"{what} min {v[low]:g} above max {v[high]:g}")
    if problems:
        return failed(step, "values", "; ".join(problems), "a DBC or signal mapping for another vehicle "
                      "([vehicle] dbc, [vehicle.signals]), or [vehicle] usable_capacity_wh")
    return passed(step, "values", _describe_values(v))


def _describe_values(v: Mapping[str, Any]) -> str:
    parts = []
    if v.get("soc_min_pct") is not None:
        parts.append(f"SoC {v['soc_min_pct']:g} % (min)")
    for name, unit, scale in (("pack_voltage_v", "V", 1), ("pack_current_a", "A", 1),
                              ("max_discharge_w", "kW discharge limit", 1e-3),
                              ("max_charge_w", "kW charge limit", 1e-3), ("nominal_full_wh", "kWh full pack", 1e-3)):
        if v.get(name) is not None:
            parts.append(f"{v[name] * scale:.1f} {unit}")
    if v.get("min_temp_c") is not None and v.get("max_temp_c") is not None:
        parts.append(f"{v['min_temp_c']:g}..{v['max_temp_c']:g} degC")
    return ", ".join(parts) + ": plausible"


STATE_FIELDS = ("bms_state", "contactor_state", "pack_contactor_neg", "pack_contactor_pos")


def _judge_states(obs: CanObservation) -> Check:
    step, v = Step.CAN, obs.values
    missing = [f for f in STATE_FIELDS if f in obs.mapped and v.get(f) is None]
    if missing or not any(f in obs.mapped for f in STATE_FIELDS):
        return failed(step, "contactors and BMS state", f"not reported: {', '.join(missing) or 'none mapped'}",
                      "the BMS status (0x212) and contactor (0x20A) messages, and [vehicle.signals]")
    bms, contactor = v.get("bms_state"), v.get("contactor_state")
    neg, pos = v.get("pack_contactor_neg"), v.get("pack_contactor_pos")
    shown = (f"BMS {_name(BmsState, bms)}, contactors {_name(ContactorState, contactor)}, pack contactors "
             f"{_name(PackContactor, neg)}/{_name(PackContactor, pos)}")
    if v.get("hvil_ok") is not None:
        shown += f", HVIL {'ok' if v['hvil_ok'] else 'NOT ok'}"
    blocked = []
    if bms is not None and bms not in ENERGY_BMS_STATES:
        blocked.append(f"BMS {_name(BmsState, bms)}")
    if contactor is not None and contactor != ContactorState.CLOSED:
        blocked.append(f"contactors {_name(ContactorState, contactor)}")
    if any(p is not None and p not in CLOSED_PACK_CONTACTORS for p in (neg, pos)):
        blocked.append("pack contactors not pulled in")
    allowed = "discharge allowed now" if not blocked else f"discharge NOT allowed now ({', '.join(blocked)})"
    if faulted := _pack_faults(bms, contactor, neg, pos):
        return failed(step, "contactors and BMS state", f"{shown}: the truck reports {', '.join(faulted)}",
                      "a fault of the truck itself: the gateway holds 0 W while it lasts (a fault that keeps "
                      "coming back locks it out); have it cleared on the truck, then commission again")
    # Open contactors are no fault: a parked truck opens them until it is asked for power.
    return passed(step, "contactors and BMS state", f"{shown}: {allowed}")


def _pack_faults(bms: Any, contactor: Any, neg: Any, pos: Any) -> list[str]:
    """What the core would take as a fault of the pack (`core.faults`): commissioning must not sign it off."""
    found = [f"BMS {_name(BmsState, bms)}"] if bms in FAULT_BMS_STATES else []
    if contactor == ContactorState.WELDED or PackContactor.WELDED in (neg, pos):
        found.append("a welded contactor")
    return found


def _name(enum: type, value: Any) -> str:
    try:
        return enum(value).name
    except ValueError:
        return f"unknown ({value})"


# ---------------------------------------------------------------------------------------------- inverter

@dataclass(frozen=True)
class InverterObservation:
    """What the gateway's SunSpec client found: discovery, state, and the revert settings read back."""

    where: str  # "192.168.1.20:502 unit 1" or "RTU /dev/ttyUSB0 unit 1"
    transport: str  # "tcp" or "rtu"
    unit_id: int
    revert_timeout_s: float
    error: str = ""  # connecting or discovering failed: why
    error_kind: str = ""  # the client's ModbusErrorCause value ("connect", "timeout", "exception"...)
    marker_at: int | None = None  # where discovery found the 'SunS' marker before it failed
    not_modbus: str = ""  # the peer is not Modbus TCP: how it showed ("it closed the connection"...)
    timeout_s: float = 1.0  # [inverter] timeout_s
    base: int | None = None
    models: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    common: Mapping[str, Any] = field(default_factory=dict)
    ratings: Mapping[str, Any] = field(default_factory=dict)
    status_error: str = ""
    inv_state: int | None = None
    measured_w: float | None = None
    grid_connected: bool = True
    grid_outage: bool = False
    alarms: int = 0
    revert_ok: bool | None = None  # None: not tried
    revert_error: str = ""
    controls: Mapping[str, Any] = field(default_factory=dict)  # model 704's command block as read back


def judge_inverter(obs: InverterObservation) -> list[Check]:
    step = Step.INVERTER
    if obs.error:
        return [failed(step, "SunSpec discovery", link_detail(obs), link_advice(obs))]
    c = obs.common
    checks = [passed(step, "SunSpec discovery", f"{obs.where}: base {obs.base}, {c.get('Mn') or '?'} "
                     f"{c.get('Md') or '?'}, serial {c.get('SN') or '?'}, version {c.get('Vr') or '?'}")]
    models = ", ".join(str(m) for m in sorted(obs.models))
    if 702 not in obs.models:
        checks.append(failed(step, "models", f"{models}: no model 702 (nameplate ratings)",
                             "an inverter whose SunSpec map lacks 702 cannot tell the gateway its ratings; "
                             "check its firmware and SunSpec settings"))
    else:
        checks.append(passed(step, "models", f"{models} (701 measurements, 702 ratings, 704 controls)"))
    checks.append(_judge_ratings(obs.ratings))
    checks.append(_judge_state(obs))
    checks.append(_judge_revert(obs))
    return checks


def _judge_ratings(r: Mapping[str, Any]) -> Check:
    """The discharge rating as the core reads it (`nameplate_discharge_w`): a `WDisChaRteMaxRtg` of 0 W
    is "cannot discharge", and passing it let the sign test discharge an inverter that said it cannot."""
    step = Step.INVERTER
    shown = ", ".join(f"{k} {_w(r.get(k))}" for k in ("WMaxRtg", "WDisChaRteMaxRtg", "WChaRteMaxRtg"))
    discha = r.get("WDisChaRteMaxRtg")
    if discha is not None and discha <= 0:
        return failed(step, "ratings", f"{shown}: WDisChaRteMaxRtg {_w(discha)}: the inverter reports it cannot "
                      "discharge, so it cannot serve the truck's energy to the home",
                      "the inverter's SunSpec settings (model 702 WDisChaRteMaxRtg) and its storage configuration")
    if not 0 < nameplate_discharge_w(r.get("WMaxRtg"), discha) < math.inf:
        return failed(step, "ratings", f"{shown}: no discharge rating",
                      "the inverter's SunSpec settings (model 702 WMaxRtg / WDisChaRteMaxRtg)")
    return passed(step, "ratings", shown)


def _w(value: Any) -> str:
    return "not implemented" if value is None else f"{value:g} W"


class LinkTrouble(StrEnum):
    """Why the inverter could not be discovered, as an installer tells the causes apart."""

    UNREACHABLE = "unreachable"  # nothing to connect to: address, port, network, serial port
    NOT_MODBUS = "not_modbus"  # something listens there, but it closed the connection or answered non-Modbus
    UNIT_ID = "unit_id"  # something answers Modbus there, but not for this unit id
    NOT_SUNSPEC = "not_sunspec"  # a Modbus device answers, without the SunSpec marker
    MODEL_CHAIN = "model_chain"  # the SunSpec marker answers at this unit id, its models do not
    OTHER = "other"


def link_trouble(obs: InverterObservation) -> LinkTrouble:
    """Connect failures are the address; a device that answers every SunSpec base with a Modbus
    exception (or not at all) is another unit id's; one that answers without 'SunS' is not SunSpec;
    one that answered 'SunS' at this unit id and then failed is its model chain's."""
    if obs.error_kind == "connect":
        return LinkTrouble.UNREACHABLE
    if obs.not_modbus:
        return LinkTrouble.NOT_MODBUS
    if obs.marker_at is not None:
        return LinkTrouble.MODEL_CHAIN
    if obs.error_kind in ("timeout", "disconnected", "exception"):
        return LinkTrouble.UNIT_ID
    if "not a SunSpec device" in obs.error:
        if "no 'SunS' marker" in obs.error:
            return LinkTrouble.NOT_SUNSPEC
        return LinkTrouble.UNIT_ID
    return LinkTrouble.OTHER


def link_detail(obs: InverterObservation) -> str:
    """What a failed discovery saw, naming the address and unit id (commission's step and `inverter probe`)."""
    trouble = link_trouble(obs)
    if trouble is LinkTrouble.NOT_MODBUS:
        address = obs.where.rsplit(" unit ", 1)[0]
        return f"{obs.where}: something listens at {address} but it is not Modbus TCP ({obs.not_modbus})"
    if trouble is LinkTrouble.MODEL_CHAIN:
        return (f"{obs.where}: the SunSpec marker answers at {obs.marker_at}, but the model chain after it "
                f"could not be read: {obs.error}")
    if trouble is LinkTrouble.UNIT_ID and obs.error_kind == "timeout":
        return f"{obs.where}: nothing answered for unit id {obs.unit_id} within {obs.timeout_s:g} s: {obs.error}"
    if trouble is LinkTrouble.UNIT_ID:
        return f"{obs.where}: a Modbus device answers there, but not for unit id {obs.unit_id}: {obs.error}"
    if trouble is LinkTrouble.NOT_SUNSPEC:
        return f"{obs.where}: a Modbus device answers there, but it is not a SunSpec device: {obs.error}"
    return obs.error


def link_advice(obs: InverterObservation) -> str:
    """What to check after a failed discovery: the settings `link_trouble` points to."""
    unit = (f"[inverter] unit_id ({obs.unit_id}): the inverter's Modbus address (device or slave id) "
            "as set on the inverter")
    slow = (f"; or, for an inverter slower to answer than that, [inverter] timeout_s ({obs.timeout_s:g} s)"
            if obs.error_kind == "timeout" else "")
    trouble = link_trouble(obs)
    if trouble is LinkTrouble.NOT_MODBUS:
        return ("[inverter] host and port: the inverter's Modbus TCP server (often port 502), not its web "
                "interface or another service")
    if trouble is LinkTrouble.MODEL_CHAIN:
        return ("the inverter's firmware and SunSpec settings: its map must read whole from the marker to the "
                f"end model (models 1, 701, 702 and 704 at least){slow}")
    if obs.transport == "rtu":
        if trouble is LinkTrouble.UNREACHABLE:
            return "[inverter] serial_port exists and this user may open it (group dialout)"
        return (f"{unit}, [inverter] baudrate, the RS-485 wiring (A/B swapped? common ground), termination "
                f"(120 ohm at each end of the line){slow}")
    if trouble is LinkTrouble.UNREACHABLE:
        return ("[inverter] host and port, that the inverter's Modbus TCP server is enabled, the network "
                "(cable, switch, the inverter's IP address), and any firewall between them")
    if trouble is LinkTrouble.UNIT_ID:
        return unit + slow
    return (f"that [inverter] host and port are the inverter's SunSpec interface (not a meter or datalogger) "
            f"with SunSpec enabled, and {unit}")


def _judge_state(obs: InverterObservation) -> Check:
    step = Step.INVERTER
    if obs.status_error:
        return failed(step, "state", f"unreadable: {obs.status_error}", "the link (see above), then run again")
    state = _name(InverterState, obs.inv_state)
    shown = (f"{state}, W {_w(obs.measured_w)}, grid {'connected' if obs.grid_connected else 'not connected'}, "
             f"alarms 0x{obs.alarms:08x}")
    if obs.inv_state == InverterState.FAULT:
        return failed(step, "state", shown, "clear the inverter's fault (its display or app), then run again")
    if obs.grid_outage:
        return failed(step, "state", f"{shown}: grid outage alarmed", "commission with the grid present")
    return passed(step, "state", shown)


def _judge_revert(obs: InverterObservation) -> Check:
    step, name = Step.INVERTER, "revert function"
    want = f"WSetEnaRvrt 1, WSetRvrt 0 W, WSetRvrtTms {max(1, int(obs.revert_timeout_s))} s"
    advice = ("the inverter must take SunSpec 704's revert (WSetEnaRvrt, WSetRvrt, WSetRvrtTms): without it, a "
              "gateway that goes silent leaves its last setpoint running; check its firmware supports it and that "
              f"[inverter] revert_timeout_s ({obs.revert_timeout_s:g} s) is within its range")
    if obs.revert_ok is None:
        return skipped(step, name, "not tried: the inverter could not be read")
    if not obs.revert_ok:
        return failed(step, name, f"{want} not accepted: {obs.revert_error or 'no answer'}", advice)
    c = obs.controls
    back = (f"WSetEnaRvrt {c.get('WSetEnaRvrt')}, WSetRvrt {_w(c.get('WSetRvrt'))}, "
            f"WSetRvrtTms {c.get('WSetRvrtTms')} s")
    if not c:  # written, but the read-back did not come: nothing says the inverter holds it
        return failed(step, name, f"{want} written, not read back", advice)
    if (c.get("WSetEnaRvrt") != 1 or c.get("WSetRvrt") not in (0, 0.0)
            or c.get("WSetRvrtTms") != max(1, int(obs.revert_timeout_s))):
        return failed(step, name, f"wrote {want}, read back {back}", advice)
    return passed(step, name, f"{back} written and read back (WSet {_w(c.get('WSet'))})")


# ---------------------------------------------------------------------------------------------- sign test

@dataclass(frozen=True)
class Sample:
    """One look at the running gateway: its command, the inverter's measured W, the BMS current, and during
    the test, `cut`: the core's mode and reason at a look where it was not serving the test ("" while it was)."""

    t: float
    setpoint_w: float
    measured_w: float | None
    current_a: float | None
    cut: str = ""


@dataclass(frozen=True)
class SignObservation:
    """A test discharge through the core: its answer, samples before and during, and how it ended."""

    target_w: float
    seconds: float
    not_ready: str = ""  # the gateway never left STARTUP: the core's reason
    answer: str = ""  # the core's answer, in words (`describe`)
    refusal: str = ""  # the ReasonCode value of a refused test
    before: tuple[Sample, ...] = ()  # the baseline, before the request
    during: tuple[Sample, ...] = ()  # the second half of the window (the ramp is over)
    pack_voltage_v: float | None = None
    reason: str = ""  # the core's reason for its command at the end of the window
    interrupted: bool = False
    stopped: bool = False  # WSet = 0 written and read back at the end
    after_w: float | None = None  # the inverter's measured W after the stop
    stop_detail: str = ""


REFUSAL_ADVICE = {
    ReasonCode.INSUFFICIENT_ENERGY.value: "the truck's SoC is at or below the floor (reserve + margin): the test "
                                          "never discharges below it; charge the truck, then run again",
    ReasonCode.OPTED_OUT.value: "the owner has opted out (`powershare-gw owner --config FILE status`)",
    ReasonCode.FAULT.value: "a fault is latched: the CAN and inverter checks above, `powershare-gw status`",
    ReasonCode.LOCKOUT.value: "the gateway is locked out: an installer reset is needed",
    ReasonCode.NO_DATA.value: "BMS or inverter data went stale: the CAN and inverter checks above",
    ReasonCode.OUTAGE.value: "the inverter reports a grid outage: commission with the grid present",
    ReasonCode.ENTER_SERVICE.value: "the inverter's enter-service delay after a grid return is running: wait, "
                                    "then run again",
    ReasonCode.STORM_WATCH.value: "the owner's storm watch keeps the energy: run again after it",
}


def judge_sign(obs: SignObservation) -> list[Check]:
    """The inverter's measured W positive and the BMS current showing a discharge, then 0 W again."""
    step = Step.SIGN
    if obs.interrupted and (obs.not_ready or not obs.answer):
        return [interrupted(step, "the test discharge was asked for")]
    if obs.not_ready:
        return [failed(step, "test discharge", f"the gateway never became ready: {obs.not_ready}",
                       "the CAN and inverter checks above: the gateway holds 0 W until both are fresh")]
    if obs.refusal:
        return [failed(step, "test discharge", f"{obs.target_w:g} W for {obs.seconds:g} s {obs.answer}",
                       REFUSAL_ADVICE.get(obs.refusal, "the core's reason above")), _judge_end(obs)]
    if obs.answer in ("", NO_ANSWER):
        return [failed(step, "test discharge", f"{obs.target_w:g} W for {obs.seconds:g} s: the core gave no answer",
                       "the gateway's log (run commission with -v)"), _judge_end(obs)]
    checks = [passed(step, "test discharge", f"{obs.target_w:g} W for {obs.seconds:g} s through the core: "
                     f"{obs.answer}")]
    if obs.interrupted:
        checks.append(failed(step, "sign", "interrupted before the test was over", "run again"))
        return [*checks, _judge_end(obs)]
    if cut := next((s.cut for s in obs.during if s.cut), ""):
        # A link lost or a fault latched mid-test: the readings left are stale or of a withdrawn command, and
        # judged as signs they blamed a correct DBC's scale, or passed a few watts as the discharge.
        checks.append(failed(step, "sign", f"the test did not hold: the core stopped serving it before its end "
                             f"({cut}); no sign is judged from it",
                             "the link or fault the core names (the gateway's warnings above; `powershare-gw "
                             "status`), then run again"))
        return [*checks, _judge_end(obs)]
    commanded = fmean(s.setpoint_w for s in obs.during) if obs.during else 0.0
    watts = [s.measured_w for s in obs.during if s.measured_w is not None]
    if commanded <= 0 or not watts:
        checks.append(failed(step, "sign", f"nothing to judge: the core commanded {commanded:.0f} W on average "
                             f"({obs.reason or 'no reason given'}), {len(watts)} inverter readings",
                             "what holds the command back, in the core's reason (open contactors, a BMS limit, "
                             "a latched fault); the CAN and inverter checks above"))
        return [*checks, _judge_end(obs)]
    measured = fmean(watts)
    w_dir = _direction(measured, SIGN_SHARE * commanded)
    delta, expected = _current_change(obs, commanded)
    i_dir = 0 if delta is None else _direction(delta, max(SIGN_SHARE * expected, MIN_CURRENT_STEP_A))
    checks.append(_judge_inverter_sign(w_dir, i_dir, commanded, measured, delta))
    checks.append(_judge_bms_sign(w_dir, i_dir, measured, delta, expected, obs))
    checks.append(_judge_end(obs))
    return checks


def _direction(value: float, threshold: float) -> int:
    return 1 if value >= threshold else -1 if value <= -threshold else 0


def _current_change(obs: SignObservation, commanded_w: float) -> tuple[float | None, float]:
    """The BMS current's change from before the test to its second half, and the change expected (A)."""
    before = [s.current_a for s in obs.before if s.current_a is not None]
    during = [s.current_a for s in obs.during if s.current_a is not None]
    expected = commanded_w / obs.pack_voltage_v if obs.pack_voltage_v else 0.0
    if not before or not during:
        return None, expected
    return fmean(during) - fmean(before), expected


def _judge_inverter_sign(w_dir: int, i_dir: int, commanded: float, measured: float, delta: float | None) -> Check:
    step, name = Step.SIGN, "inverter measured power"
    seen = f"W {measured:+.0f} W while commanded to discharge {commanded:.0f} W"
    if w_dir > 0 and measured > MAX_OVER_COMMAND * commanded + ZERO_W:
        return failed(step, name, f"{seen}: far more than commanded",
                      "the inverter's meter (its CT ratio) or W scale factor, or another source feeding the same "
                      "meter: the gateway bills energy and answers aggregators by this reading")
    if w_dir > 0:
        return passed(step, name, f"{seen}: positive = discharge, as the gateway expects")
    if w_dir == 0:
        return failed(step, name, f"{seen}: the inverter moved no power",
                      "that it is in service (its start-up or enter-service delay), its DC breaker to the "
                      "truck, its own export limit; `powershare-gw inverter probe` shows its state")
    if i_dir > 0:
        return failed(step, name, f"{seen}, and the BMS shows the pack discharging ({delta:+.1f} A): "
                      "the inverter reports its power with the opposite sign",
                      "the inverter's meter or CT is fitted backwards, or it uses the opposite sign convention: "
                      "fix it in the inverter before service (the gateway bills energy and answers aggregators "
                      "by this reading)")
    if i_dir < 0:
        return failed(step, name, f"{seen}, and the BMS shows the pack charging ({delta:+.1f} A): the "
                      "inverter did the opposite of its command",
                      "the inverter takes WSet with the opposite sign, or its DC side is wired reversed: do not "
                      "put this installation in service until a test passes")
    return failed(step, name, f"{seen}: the opposite sign", "the inverter's sign convention and its meter or CT")


def _judge_bms_sign(w_dir: int, i_dir: int, measured: float, delta: float | None, expected: float,
                    obs: SignObservation) -> Check:
    step, name = Step.SIGN, "BMS current"
    if delta is None:
        return failed(step, name, "no pack current reported before and during the test",
                      "[vehicle.signals] pack_current_a and its message")
    seen = f"pack current changed by {delta:+.2f} A ({expected:+.2f} A expected at {obs.pack_voltage_v or 0:.0f} V)"
    if i_dir > 0:
        if not obs.pack_voltage_v:
            return passed(step, name, f"{seen}: the pack discharges")
        pack_w = delta * obs.pack_voltage_v
        low, high = PACK_TO_AC_RATIO
        if w_dir > 0 and not low <= pack_w / measured <= high:
            return failed(step, name, f"{seen}: about {pack_w:.0f} W out of the pack for {measured:.0f} W at the "
                          f"inverter ({pack_w / measured:.2f} times)",
                          "the DBC's scale for the pack's voltage or current: a DBC made for another vehicle with "
                          "the same layout ([vehicle] dbc; the Model 3 layout reads an 800 V pack at half its "
                          "voltage), or [vehicle.signals] pack_voltage_v and pack_current_a: the gateway reads "
                          "every pack limit by them")
        return passed(step, name, f"{seen}: the pack discharges, about {pack_w:.0f} W out of the pack")
    if i_dir < 0:
        advice = ("the DBC's current sign ([vehicle] dbc, [vehicle.signals] pack_current_a; positive must be "
                  "discharge): the gateway reads every pack limit by it" if w_dir > 0 else
                  "see the inverter's check above")
        return failed(step, name, f"{seen}: the BMS shows a charge", advice)
    return failed(step, name, f"{seen}: no discharge shown",
                  "that the inverter's DC side is wired to this truck, and that [vehicle.signals] pack_current_a "
                  "is the pack's current signal" if w_dir > 0 else "see the inverter's check above")


def _judge_end(obs: SignObservation) -> Check:
    step, name = Step.SIGN, "back to 0 W"
    after = "not read" if obs.after_w is None else f"{obs.after_w:.0f} W"
    if obs.stopped and obs.after_w is not None and abs(obs.after_w) <= ZERO_W:  # whatever the test's power
        return passed(step, name, f"WSet = 0 written and read back; the inverter measures {after}")
    return failed(step, name, f"0 W not confirmed ({obs.stop_detail or 'no read-back'}; measured {after})",
                  "the inverter's revert timer takes it to 0 W within [inverter] revert_timeout_s; check it now "
                  "with `powershare-gw inverter probe`")


# ---------------------------------------------------------------------------------------------- dispatch

@dataclass(frozen=True)
class Reach:
    """Whether one enabled aggregator interface was reachable; `ok` None when this version cannot check it."""

    interface: str  # the config section, "dispatch.openadr"
    target: str  # the URL or address
    ok: bool | None
    detail: str


DISPATCH_ADVICE = {
    "dispatch.openadr": "[dispatch.openadr] vtn_url and ven_name (as the aggregator registered this VEN), the "
                        "certificates (cert, key, ca_file, vtn_fingerprint), DNS and the network to the VTN",
    "dispatch.openadr3": "[dispatch.openadr3] vtn_url, token_url, client_id and the secret in client_secret_file "
                         "(as the aggregator issued them), ven_name, the programs the aggregator enrolled this VEN "
                         "in, DNS and the network to the VTN",
    "dispatch.sunspec_server": "[dispatch.sunspec_server] listen: an address of this machine and a free port "
                               "(is the gateway service still running? stop it while commissioning)",
}


def judge_dispatch(reaches: Sequence[Reach]) -> list[Check]:
    step = Step.DISPATCH
    if not reaches:
        return [skipped(step, "aggregator interfaces", "none enabled ([dispatch.*] enabled = false)")]
    checks = []
    for r in reaches:
        name = f"{r.interface} ({r.target})"
        if r.ok is None:
            checks.append(skipped(step, name, r.detail))
        elif r.ok:
            checks.append(passed(step, name, r.detail))
        else:
            checks.append(failed(step, name, r.detail, DISPATCH_ADVICE.get(r.interface, "its section's keys")))
    return checks

