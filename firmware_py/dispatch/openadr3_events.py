"""OpenADR 3 events -> dispatch requests, prices and export limits (docs/dispatch.md), with no I/O.

The OpenADR 3 twin of `openadr_events`: every event a VTN can send, however
wrong, goes through `translate_event` and comes out either as a plan or as a
REJECTED answer naming what was wrong, never as an exception, because a peer's
bad message must not take the gateway's OpenADR link down (hypothesis pushes
arbitrary JSON through it in the tests).

What an event's interval payloads mean (the OpenADR 3.0.1 payload types):

- `DISPATCH_SETPOINT` (kW, positive = discharge): a request per interval;
  negative asks for charge, 0 for a stop;
- `SIMPLE` (level 0-3): a discharge request at the configured share of the rating
  (`simple_levels`), used only where no DISPATCH_SETPOINT is given;
- `EXPORT_CAPACITY_LIMIT` (kW): the most the site may export in that interval: a
  limit window (the VEN holds it as a site limit while the interval runs, so it
  caps every source), and the cap of the same interval's own discharge target;
- `PRICE` / `EXPORT_PRICE` (currency per kWh): a `PriceInterval` for the owner's
  price-responsive mode; a price is a fact, not a request.

Other payload types ride along unread. An event whose `targets` name VENs, this
one not among them, comes out `NotAddressed` (another VEN's, not answered); one every
interval of which had ended before the VEN started (`history_before`) comes out
`Past` (history, not answered: a VTN keeps events until they are deleted). Wire
formats (RFC 3339 date-times, ISO 8601 durations) are parsed here too:
`parse_duration`, `iso_duration`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from functools import partial
from typing import Any

from firmware_py.core.types import (
    DispatchAnswer,
    DispatchKind,
    DispatchRequest,
    PriceInterval,
    PriceKind,
    ReasonCode,
    is_finite_number,
    is_whole_number,
)
from firmware_py.dispatch.simple_levels import level_target_w
from firmware_py.dispatch.start_delay import start_delay_s

SOURCE = "openadr3"

# A target or limit above this is a broken payload (or a unit mix-up), not something to cap.
MAX_POWER_W = 10_000_000.0
# More intervals than this in one event is a broken (or hostile) payload: a day at 1-minute intervals fits.
MAX_INTERVALS = 2_000
# An interval longer than this is not a dispatch the gateway can budget (P9999Y, "for ever", among them).
MAX_DURATION_S = 366 * 86_400.0
# A price beyond this (per kWh, any currency) is a unit mix-up, not a tariff.
MAX_PRICE = 1_000_000.0


class PayloadType(StrEnum):
    """The event payload types the gateway acts on."""

    DISPATCH_SETPOINT = "DISPATCH_SETPOINT"
    SIMPLE = "SIMPLE"
    EXPORT_CAPACITY_LIMIT = "EXPORT_CAPACITY_LIMIT"
    PRICE = "PRICE"
    EXPORT_PRICE = "EXPORT_PRICE"


POWER_UNITS = {"KW": 1e3, "W": 1.0, "MW": 1e6}  # W per unit; the contract's default is kW
ENERGY_UNITS = {"KWH": 1.0, "WH": 1e-3, "MWH": 1e3}  # kWh per unit: a price per MWH is / 1000 per kWh


@dataclass(frozen=True)
class IntervalWindow:
    """One interval of an event: its id, where it sits on the gateway clock, its wall start (for reports),
    and the id of the request it asks for, if it asks for power."""

    interval_id: int
    start: float
    end: float
    wall_start: datetime
    duration_s: float
    request_id: str | None = None
    delay_s: float = 0.0  # a randomised start: how much later than the VTN's schedule it runs


@dataclass(frozen=True)
class LimitWindow:
    """An export capacity limit (W) for one interval, on the gateway clock."""

    id: str
    start: float
    end: float
    limit_w: float


@dataclass(frozen=True)
class ReportAsk:
    """One report descriptor of the event: which payload type, and after how many intervals each report goes.

    `every` is the descriptor's `frequency` (intervals between reports), its `numIntervals` where the
    frequency is -1 ("the same as numIntervals"); 0 means one report once the event's last interval
    has ended (both -1, their default: all the intervals in one report)."""

    payload_type: str
    every: int
    units: str | None = None


@dataclass(frozen=True)
class EventPlan:
    """What one OpenADR 3 event (at one revision) asks of the gateway.

    `requests` holds one request per interval that has not ended yet; `request_ids` names
    every interval that carries one, ended or not, so a modification that drops an interval
    cancels exactly what it dropped. `prices` and `limits` likewise hold the intervals not yet over.
    """

    event_id: str
    program_id: str
    revision: int
    intervals: tuple[IntervalWindow, ...]
    requests: tuple[DispatchRequest, ...] = ()
    request_ids: tuple[str, ...] = ()
    prices: tuple[PriceInterval, ...] = ()
    limits: tuple[LimitWindow, ...] = ()
    reports: tuple[ReportAsk, ...] = ()

    @property
    def ends_at(self) -> float:
        return max((w.end for w in self.intervals), default=-math.inf)

    @property
    def scheduled_end(self) -> float:
        """Where the event ends on the VTN's own schedule, before any randomised start moved it."""
        return max((w.end - w.delay_s for w in self.intervals), default=-math.inf)


@dataclass(frozen=True)
class NotAddressed:
    """An event whose `targets` name the VENs or resources it is for, this one not among them: another VEN's event on a
    program several VENs share, neither taken nor answered (a refusal would tell the aggregator this VEN
    failed an event it never asked this VEN to run)."""

    event_id: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Past:
    """An event every interval of which had ended before the VEN started (`history_before`): history a VTN
    keeps until it is deleted, listed again to every VEN that starts. Neither taken nor answered: refusing
    it `EXPIRED` on each start would only flood the VTN (and the report queue) with answers it needs not."""

    event_id: str
    ended_at: float  # where its last interval ended, on the gateway clock
    plan: EventPlan | None = None  # its intervals and report asks, none of them due: the energy of a run
    # that served it and stopped before reporting it all is reported from the journal


class _Invalid(Exception):
    """The event is malformed; the message is the detail answered and journaled."""


def price_id(event_id: str, interval_id: int, kind: PriceKind) -> str:
    """A published price's id: its event, interval and kind, so a PRICE and an EXPORT_PRICE of one
    interval, and a DISPATCH_SETPOINT request of the same interval, never share an id in the core."""
    return f"{event_id}#{interval_id}:{kind.value}"


def translate_event(event: Any, *, revision: int, program: Mapping[str, Any] | None, rating_w: float,
                    levels_pct: Sequence[float], to_gateway_time: Callable[[datetime], float],
                    received_at: float, source: str = SOURCE, currency: str | None = None, ven_name: str = "",
                    history_before: float = -math.inf, resources: tuple[str, ...] = ()
                    ) -> EventPlan | DispatchAnswer | NotAddressed | Past:
    """One OpenADR 3 event object (parsed JSON) -> a plan, or a REJECTED answer naming the fault.

    `revision` is the VEN's count of the versions of this event it has seen (OpenADR 3 has no
    modification number); `program` is the event's program object when the VEN has it (its
    intervalPeriod and payload descriptors are the event's defaults, its name labels prices).
    `to_gateway_time` maps a UTC datetime onto the core's clock; `received_at` is that clock's now.
    `currency` is what the owner's program pays in (`[program] currency`): a price published in
    another is refused, since the statement could only credit it as a number in the wrong money.
    `ven_name` draws this VEN's delay within a `randomizeStart` (`start_delay`); with `resources` (the names
    the VTN lists for this VEN's resources), it is what `targets` must list for the event to be this VEN's
    (`addressed_elsewhere`): else the event is `NotAddressed`.
    `history_before` (on the gateway clock, like `received_at`; none by default) is when the VEN started:
    a well-formed event of this VEN's every interval of which had ended by then is `Past`, not refused
    `EXPIRED` (an event that ended after it, listed late, is still `EXPIRED`).
    """
    event_id = event_id_of(event)
    try:
        return _translate(event, event_id, revision, program, rating_w, levels_pct, to_gateway_time,
                          received_at, source, currency, ven_name, history_before, resources)
    except _Invalid as err:
        return DispatchAnswer.refused(event_id, received_at, ReasonCode.INVALID, str(err))
    except (ArithmeticError, ValueError, TypeError, KeyError, AttributeError, IndexError, OSError) as err:
        # Last line of defence: whatever slipped past the checks below is still a bad payload.
        return DispatchAnswer.refused(event_id, received_at, ReasonCode.INVALID,
                                      f"malformed event: {type(err).__name__}: {err}")


def _translate(event: Any, event_id: str, revision: int, program: Mapping[str, Any] | None, rating_w: float,
               levels_pct: Sequence[float], to_gateway_time: Callable[[datetime], float], received_at: float,
               source: str, currency: str | None, ven_name: str,
               history_before: float, resources: tuple[str, ...]) -> EventPlan | DispatchAnswer | NotAddressed | Past:
    event = _mapping(event, "event")
    if event_id == UNKNOWN_EVENT:
        raise _Invalid("event id is missing or not a string of letters, digits, '_' or '-'")
    program_id = event.get("programID")
    if not isinstance(program_id, str) or not program_id:
        raise _Invalid("programID is missing or not a string")
    named = addressed_elsewhere(event.get("targets"), ven_name, resources)  # first: another's is not ours to refuse
    if named is not None:
        return NotAddressed(event_id, named)
    program = program if isinstance(program, Mapping) else {}
    descriptors = _descriptors(event.get("payloadDescriptors"), program.get("payloadDescriptors"))
    windows, payloads = _layout(event, program, to_gateway_time, partial(start_delay_s, ven_name, event_id))
    reports = _report_asks(event.get("reportDescriptors"))
    priority = event.get("priority")  # 0 ranks first; null after every number
    if priority is not None and (not is_whole_number(priority) or priority < 0):
        raise _Invalid(f"priority must be a whole number >= 0 or null, got {priority!r}")

    requests, request_ids, prices, limits = [], [], [], []
    single = sum(1 for p in payloads if _asks_power(p)) == 1
    label = program.get("programName") if isinstance(program.get("programName"), str) else program_id
    for n, (window, values) in enumerate(zip(windows, payloads, strict=True)):
        where = f"interval {window.interval_id}"
        limit_w = _power(values, PayloadType.EXPORT_CAPACITY_LIMIT, descriptors, where, signed=False)
        if limit_w is not None:
            limits.append(LimitWindow(f"{event_id}#{window.interval_id}", window.start, window.end, limit_w))
        target = _target(values, descriptors, rating_w, levels_pct, where)
        if target is not None:
            rid = event_id if single else f"{event_id}#{window.interval_id}"
            request_ids.append(rid)
            windows[n] = window = replace(window, request_id=rid)
            if limit_w is not None and target > limit_w:
                target = limit_w  # the event caps its own discharge
            kind = (DispatchKind.DISCHARGE if target > 0 else DispatchKind.CHARGE if target < 0
                    else DispatchKind.STOP)
            if window.end > received_at:
                requests.append(DispatchRequest(id=rid, source=source, kind=kind, target_w=abs(target),
                                                start=window.start, end=window.end, received_at=received_at,
                                                revision=revision, priority=priority))
        for kind in PriceKind:
            price = _price(values, kind, descriptors, where, currency)
            if price is not None and window.end > received_at:
                prices.append(PriceInterval(id=price_id(event_id, window.interval_id, kind), source=source,
                                            program=label, kind=kind, price_per_kwh=price, start=window.start,
                                            end=window.end, received_at=received_at, revision=revision))
    if not (request_ids or prices or limits or any(_has(p, PayloadType.PRICE) or _has(p, PayloadType.EXPORT_PRICE)
                                                    for p in payloads)):
        types = sorted({str(v.get("type")) for p in payloads for v in p})
        raise _Invalid("no DISPATCH_SETPOINT, SIMPLE, EXPORT_CAPACITY_LIMIT, PRICE or EXPORT_PRICE payload "
                       f"(got {', '.join(types) or 'none'})")
    limits = [w for w in limits if w.end > received_at]
    if not (requests or prices or limits):
        ended_at = max(w.end for w in windows)
        if ended_at <= history_before:
            return Past(event_id, ended_at, EventPlan(event_id, program_id, revision, tuple(windows),
                                                      request_ids=tuple(request_ids), reports=reports))
        return DispatchAnswer.refused(event_id, received_at, ReasonCode.EXPIRED, "every interval of the event has ended")
    return EventPlan(event_id, program_id, revision, tuple(windows), tuple(requests), tuple(request_ids),
                     tuple(prices), tuple(limits), reports)


# ---------------------------------------------------------------------- targets


def addressed_elsewhere(targets: Any, ven_name: str, resources: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The names an event's `targets` (OpenADR 3.0.1: a list of {type, values}) address it to when this VEN
    is not among them, else None (the event is this VEN's). A `VEN_NAME` entry must list `ven_name`; a
    `RESOURCE_NAME` entry one of this VEN's resources: itself (its reports name it so) and those the VTN
    lists in its VEN object (`resources`). Several entries each narrow the event. Types the gateway cannot
    judge (a group, OpenADR 3.1's bare strings, which the VTN matches against targets the VEN object does
    not carry here) narrow nothing, and a VEN without a name judges no target.
    Malformed targets are `_Invalid`, naming `targets`."""
    if targets is None:
        return None
    if not isinstance(targets, list):
        raise _Invalid(f"targets must be a list of {{type, values}} objects, got {type(targets).__name__}")
    mine = {"VEN_NAME": {ven_name}, "RESOURCE_NAME": {ven_name, *resources}}
    named: set[str] = set()
    ours = True
    for n, target in enumerate(targets):
        if isinstance(target, str):
            continue
        if not (isinstance(target, Mapping) and isinstance(target.get("type"), str)
                and isinstance(target.get("values"), list)):
            raise _Invalid(f"targets[{n}] must be an object with a string type and a list of values")
        if target["type"] in mine:
            names = {v for v in target["values"] if isinstance(v, str)}
            named |= names
            ours = ours and bool(names & mine[target["type"]])
    return None if ours or not ven_name else tuple(sorted(named))


# ---------------------------------------------------------------------- intervals


def _layout(event: Mapping[str, Any], program: Mapping[str, Any], to_gateway_time: Callable[[datetime], float],
            delay_s: Callable[[float], float]) -> tuple[list[IntervalWindow], list[list[Mapping[str, Any]]]]:
    """Each interval's window and payloads, laid out as OpenADR 3 inherits periods: an interval's own
    start and duration where given, else the event's (else the program's) duration, and the event's
    start advanced by the durations of every interval before it. When any interval's period (or the
    default it inherits) has a `randomizeStart`, every interval moves `delay_s` of the widest later."""
    intervals = event.get("intervals")
    if not isinstance(intervals, list) or not intervals:
        raise _Invalid("event has no intervals")
    if len(intervals) > MAX_INTERVALS:
        raise _Invalid(f"{len(intervals)} intervals in one event (at most {MAX_INTERVALS})")
    periods = [(_mapping(period, where) if period is not None else {}, where) for period, where in (
        (event.get("intervalPeriod"), "intervalPeriod"), (program.get("intervalPeriod"), "program's intervalPeriod"))]
    inherited: dict[str, Any] = {}

    def inherit(key: str) -> Any:
        """The default start, duration or spread, field by field (the event's, else the program's): an event
        giving its start may leave the duration or `randomizeStart` to its program. Read only when an interval
        lacks its own: a program's span may be a year (`P1Y`), which no interval can be, and events whose
        intervals say their own periods must not be refused for it."""
        if key not in inherited:
            parse = {"start": _start, "duration": _duration, "randomizeStart": _randomize_s}[key]
            value, where = next(((p[key], w) for p, w in periods if p.get(key) is not None), (None, "intervalPeriod"))
            inherited[key] = parse(value, f"{where}.{key}")
        return inherited[key]

    elapsed_s = 0.0
    windows, payloads, seen, spreads = [], [], set(), []
    for index, interval in enumerate(intervals):
        interval = _mapping(interval, f"interval {index}")
        interval_id = interval.get("id")
        if not is_whole_number(interval_id) or abs(interval_id) > 2**31:
            raise _Invalid(f"interval {index}: id must be a whole number, got {interval_id!r}")
        if interval_id in seen:
            raise _Invalid(f"interval id {interval_id} appears twice")
        seen.add(interval_id)
        where = f"interval {interval_id}"
        own = interval.get("intervalPeriod")
        own = _mapping(own, f"{where}.intervalPeriod") if own is not None else {}
        seconds = _duration(own.get("duration"), f"{where}.intervalPeriod.duration") or inherit("duration")
        if seconds is None:
            raise _Invalid(f"{where} has no duration (none of its own, the event's or the program's)")
        start = _start(own.get("start"), f"{where}.intervalPeriod.start")
        if start is None and inherit("start") is not None:
            start = inherit("start") + timedelta(seconds=elapsed_s)
        if start is None:
            raise _Invalid(f"{where} has no start (none of its own, the event's or the program's)")
        elapsed_s += seconds
        spread = own.get("randomizeStart")
        spreads.append(_randomize_s(spread, f"{where}.intervalPeriod.randomizeStart") if spread is not None
                       else inherit("randomizeStart"))
        end = start + timedelta(seconds=seconds)
        start_s, end_s = to_gateway_time(start), to_gateway_time(end)
        if not (is_finite_number(start_s) and is_finite_number(end_s)):
            raise _Invalid(f"{where} cannot be placed on the gateway clock")
        windows.append(IntervalWindow(interval_id, float(start_s), float(end_s), start, seconds))
        payloads.append(_payloads(interval.get("payloads"), where))
    # Listed in any order (each interval may carry its own start): laid out by start time. The cadence
    # reports go by the order intervals end in (they may overlap), which the VEN takes from these.
    order = sorted(range(len(windows)), key=lambda n: windows[n].start)
    windows, payloads = [windows[n] for n in order], [payloads[n] for n in order]
    # One delay for the whole event, over its widest window: intervals moved apart could overlap or
    # end out of order, and both the request in force and the reports go by their order.
    delay = delay_s(max(spreads))
    if delay:
        windows = [replace(w, start=w.start + delay, end=w.end + delay, delay_s=delay,
                           wall_start=w.wall_start + timedelta(seconds=delay)) for w in windows]
    return windows, payloads


def _payloads(value: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        raise _Invalid(f"{where}.payloads must be a list, got {type(value).__name__}")
    found = []
    for n, item in enumerate(value):
        item = _mapping(item, f"{where}.payloads[{n}]")
        if not isinstance(item.get("type"), str):
            raise _Invalid(f"{where}.payloads[{n}].type must be a string, got {item.get('type')!r}")
        if not isinstance(item.get("values"), list):
            raise _Invalid(f"{where}.payloads[{n}].values must be a list, got {item.get('values')!r}")
        found.append(item)
    types = [p["type"] for p in found if p["type"] in set(PayloadType)]
    if len(types) != len(set(types)):
        raise _Invalid(f"{where}: a payload type appears twice: ambiguous")
    return found


def _has(payloads: list[Mapping[str, Any]], kind: PayloadType) -> bool:
    return any(p["type"] == kind for p in payloads)


def _asks_power(payloads: list[Mapping[str, Any]]) -> bool:
    return _has(payloads, PayloadType.DISPATCH_SETPOINT) or _has(payloads, PayloadType.SIMPLE)


def _value(payloads: list[Mapping[str, Any]], kind: PayloadType, where: str) -> float | None:
    """The one number a payload of this type carries, or None when the interval has none."""
    item = next((p for p in payloads if p["type"] == kind), None)
    if item is None:
        return None
    values = item["values"]
    if len(values) != 1 or not is_finite_number(values[0]):
        raise _Invalid(f"{where}: {kind} must carry exactly one finite number, got {values!r}")
    return float(values[0])


def _power(payloads: list[Mapping[str, Any]], kind: PayloadType, descriptors: Mapping[str, Mapping[str, Any]],
           where: str, *, signed: bool) -> float | None:
    value = _value(payloads, kind, where)
    if value is None:
        return None
    units = descriptors.get(kind, {}).get("units") or "KW"
    if units not in POWER_UNITS:
        raise _Invalid(f"{kind} units must be one of {', '.join(POWER_UNITS)}, got {units!r}")
    watts = value * POWER_UNITS[units]
    if not signed and watts < 0:
        raise _Invalid(f"{where}: {kind} must be >= 0, got {value!r} {units}")
    if abs(watts) > MAX_POWER_W:
        raise _Invalid(f"{where}: {kind} {value!r} {units} is implausible (beyond {MAX_POWER_W:.0f} W)")
    return watts


def _target(payloads: list[Mapping[str, Any]], descriptors: Mapping[str, Mapping[str, Any]], rating_w: float,
            levels_pct: Sequence[float], where: str) -> float | None:
    """The interval's power ask (W, + discharge): DISPATCH_SETPOINT if given, else a SIMPLE level, else None."""
    setpoint = _power(payloads, PayloadType.DISPATCH_SETPOINT, descriptors, where, signed=True)
    if setpoint is not None:
        return setpoint
    level = _value(payloads, PayloadType.SIMPLE, where)
    if level is None:
        return None
    if not (is_finite_number(rating_w) and rating_w > 0):
        raise _Invalid(f"SIMPLE level needs the gateway's rating, which is unknown ({rating_w!r})")
    try:
        return level_target_w(int(level) if level.is_integer() else level, rating_w, levels_pct)
    except ValueError as err:
        raise _Invalid(f"{where}: {err}") from None


def _price(payloads: list[Mapping[str, Any]], kind: PriceKind, descriptors: Mapping[str, Mapping[str, Any]],
           where: str, currency: str | None) -> float | None:
    value = _value(payloads, PayloadType(kind.value), where)
    if value is None:
        return None
    published = descriptors.get(kind.value, {}).get("currency")
    if currency and published and published != currency:
        raise _Invalid(f"{kind.value} is published in {published!r}; the owner's program pays in {currency!r}")
    units = descriptors.get(kind.value, {}).get("units") or "KWH"
    if units not in ENERGY_UNITS:
        raise _Invalid(f"{kind.value} units must be one of {', '.join(ENERGY_UNITS)}, got {units!r}")
    per_kwh = value / ENERGY_UNITS[units]
    if abs(per_kwh) > MAX_PRICE:
        raise _Invalid(f"{where}: {kind.value} {value!r} per {units} is implausible")
    return per_kwh


def _descriptors(*sources: Any) -> dict[str, Mapping[str, Any]]:
    """payloadType -> its descriptor, field by field: the event's own where it gives the field, else the
    program's. `units` and `currency` are optional in OpenADR 3: an event repeating a descriptor without
    them still means the program's (a unit-less DISPATCH_SETPOINT must not fall back to kW over a W)."""
    found: dict[str, dict[str, Any]] = {}
    for source in sources:
        for kind, item in _first_per_type(source).items():
            given = {key: value for key, value in item.items() if value is not None}
            found[kind] = {**given, **found.get(kind, {})}
    return found


def _first_per_type(source: Any) -> dict[str, Mapping[str, Any]]:
    """One list of payload descriptors, checked: payloadType -> the first descriptor of that type."""
    found: dict[str, Mapping[str, Any]] = {}
    if source is None:
        return found
    if not isinstance(source, list):
        raise _Invalid(f"payloadDescriptors must be a list, got {type(source).__name__}")
    for n, item in enumerate(source):
        item = _mapping(item, f"payloadDescriptors[{n}]")
        kind = item.get("payloadType")
        if not isinstance(kind, str):
            raise _Invalid(f"payloadDescriptors[{n}].payloadType must be a string, got {kind!r}")
        units = item.get("units")
        if units is not None and not isinstance(units, str):
            raise _Invalid(f"payloadDescriptors[{n}].units must be a string, got {units!r}")
        found.setdefault(kind, item)
    return found


def _report_asks(value: Any) -> tuple[ReportAsk, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Invalid(f"reportDescriptors must be a list, got {type(value).__name__}")
    asks = []
    for n, item in enumerate(value[:32]):
        item = _mapping(item, f"reportDescriptors[{n}]")
        kind, every = item.get("payloadType"), item.get("frequency", -1)
        if not isinstance(kind, str) or not kind:
            raise _Invalid(f"reportDescriptors[{n}].payloadType must be a string, got {kind!r}")
        if not is_whole_number(every) or every < -1 or every > MAX_INTERVALS:
            raise _Invalid(f"reportDescriptors[{n}].frequency must be -1 or a whole number of intervals, "
                           f"got {every!r}")
        count = item.get("numIntervals", -1)
        if not is_whole_number(count) or count < -1 or count > MAX_INTERVALS:
            raise _Invalid(f"reportDescriptors[{n}].numIntervals must be -1 or a whole number of intervals, "
                           f"got {count!r}")
        if every == -1:  # "the same as numIntervals", itself -1 (all intervals: once at the end) by default
            every = count
        units = item.get("units")
        asks.append(ReportAsk(kind, max(every, 0), units if isinstance(units, str) else None))
    return tuple(asks)


# ---------------------------------------------------------------------- wire formats

_NUMBER = r"\d+(?:[.,]\d+)?"
_DURATION = re.compile(rf"P(?:(?P<Y>\d+)Y)?(?:(?P<MO>\d+)M)?(?:(?P<W>{_NUMBER})W)?(?:(?P<D>{_NUMBER})D)?"
                       rf"(?:T(?:(?P<H>{_NUMBER})H)?(?:(?P<MI>{_NUMBER})M)?(?:(?P<S>{_NUMBER})S)?)?", re.ASCII)
# OpenADR 3 writes "now" as the first instant of year 1 (0001-01-01).
_NOW_YEAR = 1


def parse_duration(text: str) -> float:
    """An ISO 8601 duration (PT1H, P1DT30M, PT0.5S) in seconds; ValueError for calendar units or junk."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) and len(text) <= 64 else None
    if match is None or text in ("P", "PT") or text.endswith("T"):
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    if match["Y"] or match["MO"]:
        raise ValueError(f"calendar durations (years, months) are not supported: {text!r}")
    given = [k for k in ("W", "D", "H", "MI", "S") if match[k] is not None]
    if any(not match[k].isdigit() for k in given[:-1]):
        raise ValueError(f"only the smallest unit of an ISO 8601 duration may have a fraction: {text!r}")
    weeks, days, hours, minutes, seconds = (float((match[k] or "0").replace(",", "."))
                                            for k in ("W", "D", "H", "MI", "S"))
    return (((weeks * 7 + days) * 24 + hours) * 60 + minutes) * 60 + seconds


def iso_duration(seconds: float) -> str:
    """Seconds as an ISO 8601 duration the way OpenADR 3 writes them (PT3600S, PT0.5S)."""
    whole = round(seconds)
    return f"PT{whole}S" if abs(seconds - whole) < 1e-9 else f"PT{seconds:.3f}S"


def iso_datetime(moment: datetime) -> str:
    """An instant as RFC 3339 UTC with a Z, the way OpenADR 3 writes them."""
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_datetime(text: Any, where: str = "date-time") -> datetime:
    """An RFC 3339 date-time with its offset; ValueError naming `where` otherwise."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError(f"{where} must be an RFC 3339 date-time string, got {text!r}")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))  # RFC 3339 allows either case
    except ValueError:
        raise ValueError(f"{where} is not an RFC 3339 date-time: {text!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"{where} must carry its UTC offset (Z or +hh:mm): {text!r}")
    return moment


def _start(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = parse_datetime(value, where)
    except ValueError as err:
        raise _Invalid(str(err)) from None
    if moment.year == _NOW_YEAR:
        raise _Invalid(f"{where}: a start of 'now' (0001-01-01) is not supported: give the instant")
    return moment


def _duration(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise _Invalid(f"{where}: {err}") from None
    if seconds <= 0:
        raise _Invalid(f"{where} must be > 0, got {value!r}")
    if seconds > MAX_DURATION_S:
        raise _Invalid(f"{where} {value!r} is longer than a year (open-ended intervals are not supported)")
    return seconds


def _randomize_s(value: Any, where: str) -> float:
    """A `randomizeStart` window in seconds: none (null) or PT0S is 0."""
    if value is None:
        return 0.0
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise _Invalid(f"{where}: {err}") from None
    if not 0 <= seconds <= MAX_DURATION_S:
        raise _Invalid(f"{where} must be from PT0S to a year, got {value!r}")
    return seconds


# ---------------------------------------------------------------------- small parts

UNKNOWN_EVENT = "<unknown event>"
OBJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""OpenADR 3's objectID: what an id of an event, a program or a subscription may be."""


def event_id_of(event: Any) -> str:
    """The id to answer under, even when the event is too broken to translate (OpenADR 3 objectID)."""
    event_id = event.get("id") if isinstance(event, Mapping) else None
    return event_id if isinstance(event_id, str) and OBJECT_ID.fullmatch(event_id) else UNKNOWN_EVENT


def program_id_of(obj: Any) -> str | None:
    """The programID an event or subscription names, None when it names none a program could have (a list,
    an object, a number): such an object is in none of this VEN's programs, and looking it up must not raise."""
    program_id = obj.get("programID") if isinstance(obj, Mapping) else None
    return program_id if isinstance(program_id, str) else None


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"{where} must be an object, got {type(value).__name__}")
    return value
