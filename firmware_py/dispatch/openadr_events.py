"""OpenADR 2.0b events -> dispatch requests (docs/dispatch.md), with no I/O.

Kept apart from the VEN so that every payload a VTN can send, however wrong,
can be pushed through it by hypothesis: the answer is always either a plan of
requests or a REJECTED answer saying what was wrong, never an exception, because
a peer's bad message must not take the gateway's OpenADR link down.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from firmware_py.core.types import (
    DispatchAnswer,
    DispatchKind,
    DispatchRequest,
    ReasonCode,
    is_finite_number,
    is_whole_number,
)
from firmware_py.dispatch.simple_levels import level_target_w
from firmware_py.dispatch.start_delay import start_delay_s

SOURCE = "openadr"
LOAD_DISPATCH = "LOAD_DISPATCH"
SIMPLE_NAMES = ("SIMPLE", "simple")

# A request above this is a broken payload (or a unit mix-up), not something to cap:
# no single residential DER is dispatched at 10 MW.
MAX_TARGET_W = 10_000_000.0

SI_SCALE = {"p": 1e-12, "n": 1e-9, "micro": 1e-6, "m": 1e-3, "c": 1e-2, "d": 1e-1,
            "none": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


@dataclass(frozen=True)
class EventPlan:
    """What one OpenADR event (at one modificationNumber) asks of the gateway.

    `requests` holds one request per interval that has not ended yet;
    `request_ids` names every interval of the event, ended or not, so a
    modification that drops an interval can cancel exactly what it dropped.
    """

    event_id: str
    revision: int
    cancelled: bool
    requests: tuple[DispatchRequest, ...] = ()
    request_ids: tuple[str, ...] = ()
    test: bool = False
    """A test event (`test_event` anything but false): acknowledged, never acted on."""
    delay_s: float = 0.0
    """How much later than the VTN's schedule this VEN runs the event (a randomised start)."""


@dataclass(frozen=True)
class NotAddressed:
    """An event whose `targets` name the VENs (or resources) it is for, this VEN not among them: another
    site's event. Answered optOut (a 2.0b VTN expects an answer to every event) and never run; an earlier
    revision this VEN held is withdrawn, as a cancelled one is."""

    event_id: str
    revision: int
    detail: str


class WireDuration(timedelta):
    """A duration as read off the wire, keeping its text: a 0 is "until cancelled" only when the VTN wrote a
    zero ('PT0S', or 'P' as openleadr writes it), never a length some reader took for 0 ('P1W' in openleadr's)."""

    text: str


# 2.0b durations (RFC 5545, as the xcal schema writes them): weeks alone, or years..seconds. openleadr's own
# parser reads 'P1W' as 0 s, which a last interval turned into "until cancelled".
_DURATION = re.compile(r"^([+-])?P(?:(\d+)W|(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?)$",
                       re.ASCII)
_BARE_WEEKS = re.compile(r"^(\d+)W$", re.ASCII)  # the schema's other branch: weeks without the P
# 2.0b date-times (xcal): UTC, the trailing Z optional (a Z-less time is UTC all the same).
_DATE_TIME = re.compile(r"^\+?(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d*))?Z?$", re.ASCII)


def parse_wire_duration(value: Any) -> Any:
    """A 2.0b duration's text as a `WireDuration`; text that is none stays text, for the translator to refuse
    by name. 'P' (no component) is 0: openleadr's VTN writes a 0 so. Years and months count 365 and 30 days,
    as openleadr's."""
    if isinstance(value, timedelta) or not isinstance(value, str):
        return value
    text = value.strip()
    weeks = _BARE_WEEKS.match(text)
    found = _DURATION.match(text)
    if weeks is None and found is None:
        return value
    if weeks is not None:
        sign, parts = None, (weeks.group(1), None, None, None, None, None, None)
    else:
        sign, parts = found.group(1), found.groups()[1:]
    w, y, mo, d, h, mi, s = (int(part) if part else 0 for part in parts)
    try:
        length = timedelta(weeks=w, days=d + 365 * y + 30 * mo, hours=h, minutes=mi, seconds=s)
    except OverflowError:
        return value
    parsed = WireDuration(seconds=(-length if sign == "-" else length).total_seconds())
    parsed.text = text
    return parsed


def parse_wire_datetime(value: Any) -> Any:
    """A 2.0b date-time's text as an aware UTC datetime, with or without its trailing Z; text that is not
    one (or names no real date) stays text, for the translator to refuse by name."""
    if not isinstance(value, str):
        return value
    found = _DATE_TIME.match(value.strip())
    if found is None:
        return value
    *fields, fraction = found.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        return datetime(*(int(f) for f in fields), micro, tzinfo=timezone.utc)
    except ValueError:
        return value


def is_literal_zero(duration: timedelta) -> bool:
    """True unless the duration came off the wire as something other than a written zero (see
    `WireDuration`); a plain timedelta (the simulator's, the tests') is taken at its value."""
    text = getattr(duration, "text", None)
    return duration == timedelta(0) and (text is None or re.search(r"[1-9]", text) is None)


class _Invalid(Exception):
    """The event is malformed; the message is the detail returned to the log."""


def translate_event(event: Any, *, rating_w: float, levels_pct: Sequence[float],
                    to_gateway_time: Callable[[datetime], float], received_at: float,
                    source: str = SOURCE, ven_name: str = "", ven_id: str = "") -> EventPlan | DispatchAnswer | NotAddressed:
    """Turn one openleadr event dict into a plan, or a REJECTED answer naming the fault.

    `to_gateway_time` maps the event's UTC datetimes onto the core's clock
    (identity-ish `datetime.timestamp` in `run`, a mapping in the simulator);
    `received_at` is that clock's now. Intervals that have already ended get no
    request; if none is left the answer is EXPIRED. An event whose start the VTN
    randomises (`startafter`) starts this VEN's delay later (`start_delay`). An event whose
    targets name other VENs (`ven_id`) or resources (`ven_name`) is `NotAddressed` (`addressed_to_us`).
    """
    event_id = _event_id_of(event)
    try:
        return _translate(event, event_id, rating_w, levels_pct, to_gateway_time, received_at, source, ven_name,
                          ven_id)
    except _Invalid as err:
        return _refusal(event_id, received_at, ReasonCode.INVALID, str(err))
    except (ArithmeticError, ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        # Last line of defence: whatever slipped past the checks below is still a bad payload.
        return _refusal(event_id, received_at, ReasonCode.INVALID,
                        f"malformed event: {type(err).__name__}: {err}")


def _translate(event: Any, event_id: str, rating_w: float, levels_pct: Sequence[float],
               to_gateway_time: Callable[[datetime], float], received_at: float,
               source: str, ven_name: str, ven_id: str) -> EventPlan | DispatchAnswer | NotAddressed:
    descriptor = _mapping(_mapping(event, "event").get("event_descriptor"), "event_descriptor")
    if not isinstance(descriptor.get("event_id"), str) or not descriptor["event_id"]:
        raise _Invalid("event_descriptor.event_id is missing or not a string")
    revision = descriptor.get("modification_number")
    if not is_whole_number(revision) or revision < 0:
        raise _Invalid(f"modification_number must be a whole number >= 0, got {revision!r}")
    if descriptor.get("event_status") == "cancelled":
        return EventPlan(event_id, revision, cancelled=True)
    if (refused := addressed_elsewhere(event.get("targets"), ven_id, ven_name)) is not None:
        return NotAddressed(event_id, revision, refused)
    if descriptor.get("test_event") not in (None, False, "false", "False"):  # 2.0b: anything but false
        return EventPlan(event_id, revision, cancelled=False, test=True)
    priority = descriptor.get("priority")
    if priority is not None and (not is_whole_number(priority) or priority < 0):
        raise _Invalid(f"priority must be a whole number >= 0, got {priority!r}")

    signal = _pick_signal(event)
    name = signal["signal_name"]
    delay_s = start_delay_s(ven_name, event_id, _startafter_s(event))
    windows = [(start + delay_s, end + delay_s, payload)
               for start, end, payload in _windows(event, signal, to_gateway_time)]
    ids = request_ids(event_id, len(windows))
    if name == LOAD_DISPATCH:
        scale = _load_dispatch_scale(signal)
        targets = [_dispatch_target(payload * scale) for _, _, payload in windows]
    else:
        if not (is_finite_number(rating_w) and rating_w > 0):
            return _refusal(event_id, received_at, ReasonCode.NO_DATA,
                            f"SIMPLE level needs the gateway's rating, which is unknown ({rating_w!r})")
        targets = [_simple_target(payload, rating_w, levels_pct) for _, _, payload in windows]

    requests = tuple(
        DispatchRequest(id=request_id, source=source,
                        kind=DispatchKind.DISCHARGE if target > 0 else DispatchKind.STOP,
                        target_w=target, start=start, end=end, received_at=received_at, revision=revision,
                        priority=priority or None)  # 2.0b: 0 is no priority, ranked after every other
        for request_id, (start, end, _), target in zip(ids, windows, targets, strict=True)
        if end > received_at
    )
    if not requests:
        return _refusal(event_id, received_at, ReasonCode.EXPIRED, "every interval of the event has ended")
    return EventPlan(event_id, revision, cancelled=False, requests=requests, request_ids=ids, delay_s=delay_s)


# The target types the VEN can judge: its own VEN id, and its one resource, named `ven_name` (the resource_id its
# reports carry). Groups, parties, assets, nodes... are the VTN's to resolve: an event naming only those is taken.
JUDGED_TARGETS = ("ven_id", "resource_id")


def addressed_elsewhere(targets: Any, ven_id: str, ven_name: str) -> str | None:
    """Why an event is not this VEN's, or None when it is (or its targets name no VEN and no resource).

    openleadr lists an event's targets as one-entry {type: value} maps. The event is this VEN's when its
    `ven_id` targets list this VEN's id or its `resource_id` targets list `ven_name` (the targets together
    are the set the event is for); when it names VENs or resources, none of them this one, it is another's.
    Malformed targets are `_Invalid`, naming `targets` (the OpenADR 3 VEN's rule, `ven_names_targeted`)."""
    if targets is None or targets == []:
        return None
    if not isinstance(targets, list):
        raise _Invalid(f"targets must be a list, got {type(targets).__name__}")
    named: dict[str, list[str]] = {kind: [] for kind in JUDGED_TARGETS}
    for n, target in enumerate(targets):
        if not isinstance(target, Mapping) or not target or not all(isinstance(k, str) for k in target):
            raise _Invalid(f"targets[{n}] must be a map of target type to value, got {target!r}")
        for kind, value in target.items():
            if kind not in named:
                continue  # a group, a party... the VTN resolves those
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) for v in values):
                raise _Invalid(f"targets[{n}].{kind} must be a non-empty id, got {value!r}")
            named[kind] += [str(v) for v in values]
    ours = {"ven_id": ven_id, "resource_id": ven_name}
    if not any(named.values()) or any(ours[kind] and ours[kind] in named[kind] for kind in JUDGED_TARGETS):
        return None
    return "addressed to " + " and ".join(f"{kind} {', '.join(map(repr, named[kind]))}"
                                          for kind in JUDGED_TARGETS if named[kind]) \
        + f", not this VEN (ven_id {ven_id!r}, resource {ven_name!r})"


def request_ids(event_id: str, intervals: int) -> tuple[str, ...]:
    """One request id per interval: the event's id for a one-interval event, `EVENTID#N` otherwise.

    Every `#` of the event's id is written twice, so that no id can name two things: an event
    called `peak#1` would otherwise take the id of the second interval of an event `peak`.
    """
    escaped = event_id.replace("#", "##")
    if intervals == 1:
        return (escaped,)
    return tuple(f"{escaped}#{index}" for index in range(intervals))


def _pick_signal(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """LOAD_DISPATCH if present (a SIMPLE signal may ride along with it), else SIMPLE."""
    signals = event.get("event_signals")
    if isinstance(signals, Mapping):  # openleadr sometimes nests the list one level deeper
        signals = signals.get("event_signals")
    if not isinstance(signals, list) or not signals:
        raise _Invalid("event has no event_signals")
    if not all(isinstance(s, Mapping) for s in signals):
        raise _Invalid("an event signal is not a structure")
    names = [s.get("signal_name") for s in signals]
    load, simple = (_one(signals, wanted) for wanted in ((LOAD_DISPATCH,), SIMPLE_NAMES))
    if load is not None and (simple is None or load.get("signal_type", "setpoint") == "setpoint"):
        return load  # (a signal type other than setpoint is refused, naming it, when no SIMPLE rides along)
    if simple is not None:
        return simple
    raise _Invalid(f"no LOAD_DISPATCH or SIMPLE signal (got {', '.join(map(repr, names))})")


def _one(signals: list[Mapping[str, Any]], names: tuple[str, ...]) -> Mapping[str, Any] | None:
    found = [s for s in signals if s.get("signal_name") in names]
    if len(found) > 1:
        raise _Invalid(f"{len(found)} {names[0]} signals in one event: ambiguous")
    return found[0] if found else None


def _windows(event: Mapping[str, Any], signal: Mapping[str, Any],
             to_gateway_time: Callable[[datetime], float]) -> list[tuple[float, float, float]]:
    """(start, end, payload) per interval on the gateway clock.

    An interval without its own dtstart follows the previous one, starting at
    the active period's dtstart, as OpenADR lays them out.
    """
    intervals = signal.get("intervals")
    if not isinstance(intervals, list) or not intervals:
        raise _Invalid(f"{signal['signal_name']} signal has no intervals")
    period = event.get("active_period")
    at = _datetime(period.get("dtstart"), "active_period.dtstart") if isinstance(period, Mapping) else None
    windows = []
    for index, interval in enumerate(intervals):
        where = f"interval {index}"
        interval = _mapping(interval, where)
        if interval.get("dtstart") is not None:
            at = _datetime(interval["dtstart"], f"{where}.dtstart")
        if at is None:
            raise _Invalid(f"{where} has no start (no dtstart and no active_period)")
        duration = interval.get("duration")
        if not isinstance(duration, timedelta):
            raise _Invalid(f"{where}.duration must be a duration, got {duration!r}")
        if duration == timedelta(0) and not is_literal_zero(duration):  # a length read as 0: never "no end"
            raise _Invalid(f"{where}.duration {getattr(duration, 'text', '')!r} was read as 0 s")
        open_ended = duration == timedelta(0) and index == len(intervals) - 1
        if duration <= timedelta(0) and not open_ended:
            raise _Invalid(f"{where}.duration must be > 0 (only the last interval may be 0: no end), got {duration}")
        payload = interval.get("signal_payload")
        if not is_finite_number(payload):
            raise _Invalid(f"{where}.signal_payload must be a finite number, got {payload!r}")
        end = at + duration
        start_s = to_gateway_time(at)
        end_s = math.inf if open_ended else to_gateway_time(end)  # 2.0b: 0 = until cancelled
        if not (is_finite_number(start_s) and (open_ended or is_finite_number(end_s))):
            raise _Invalid(f"{where} cannot be placed on the gateway clock")
        windows.append((float(start_s), float(end_s), float(payload)))
        at = end
    return windows


def _startafter_s(event: Mapping[str, Any]) -> float:
    """The window the VTN spreads the event's start over (`active_period.tolerance.tolerate.startafter`),
    in seconds; 0 when it gives none."""
    period = event.get("active_period")
    tolerance = period.get("tolerance") if isinstance(period, Mapping) else None
    tolerate = _mapping(tolerance, "active_period.tolerance").get("tolerate") if tolerance is not None else None
    startafter = _mapping(tolerate, "tolerance.tolerate").get("startafter") if tolerate is not None else None
    if startafter is None:
        return 0.0
    if not isinstance(startafter, timedelta) or startafter < timedelta(0):
        raise _Invalid(f"tolerance.tolerate.startafter must be a duration >= 0, got {startafter!r}")
    return startafter.total_seconds()


def _load_dispatch_scale(signal: Mapping[str, Any]) -> float:
    """W per payload unit: the contract says kW, and a powerReal measurement may say so explicitly."""
    if signal.get("signal_type", "setpoint") != "setpoint":
        raise _Invalid(f"LOAD_DISPATCH signal_type {signal.get('signal_type')!r} is not supported "
                       "(only 'setpoint')")
    measurement = signal.get("measurement")
    if measurement is None:
        return 1e3
    measurement = _mapping(measurement, "LOAD_DISPATCH measurement")
    if measurement.get("unit") != "W":
        raise _Invalid(f"LOAD_DISPATCH unit must be W (powerReal), got {measurement.get('unit')!r}")
    scale = measurement.get("scale") or "none"
    if scale not in SI_SCALE:
        raise _Invalid(f"unknown SI scale code {scale!r}")
    return SI_SCALE[scale]


def _dispatch_target(watts: float) -> float:
    if not is_finite_number(watts) or watts < 0:
        raise _Invalid(f"LOAD_DISPATCH target must be >= 0 W (discharge), got {watts!r} W")
    if watts > MAX_TARGET_W:
        raise _Invalid(f"LOAD_DISPATCH target {watts:.6g} W is implausible (above {MAX_TARGET_W:.0f} W)")
    return watts


def _simple_target(level: float, rating_w: float, levels_pct: Sequence[float]) -> float:
    try:
        return level_target_w(level, rating_w, levels_pct)
    except ValueError as err:
        raise _Invalid(str(err)) from None


def _refusal(event_id: str, at: float, reason: ReasonCode, detail: str) -> DispatchAnswer:
    return DispatchAnswer.refused(event_id, at, reason, detail)


def _event_id_of(event: Any) -> str:
    """The id to answer under, even when the event is too broken to translate."""
    descriptor = event.get("event_descriptor") if isinstance(event, Mapping) else None
    event_id = descriptor.get("event_id") if isinstance(descriptor, Mapping) else None
    return event_id if isinstance(event_id, str) and event_id else "<unknown event>"


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"{where} must be a structure, got {type(value).__name__}")
    return value


def _datetime(value: Any, where: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise _Invalid(f"{where} must be a UTC date-time, got {value!r}")
    return value
