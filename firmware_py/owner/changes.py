"""What each owner request does to the settings: pure, so every rule is testable alone.

Each function takes the current settings, the request body (`parse_body`) and the gateway's
`now` (and the owner's time zone where a wall-clock time is involved) and
returns the new settings, or raises BadRequest with a message meant for the
owner. Times are stored absolute, on the gateway clock, so the core never has
to know about time zones.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import replace
from typing import Any

from firmware_py.core.types import OwnerSettings, PriceKind, is_finite_number
from firmware_py.quoting import out_of_range, shown, shown_text

MAX_EVENT_ID = 200
MAX_OPT_OUT_EVENTS = 32
"""Single-event opt-outs kept at once: every change rewrites them all, and the MQTT state carries them."""
MAX_AHEAD_DAYS = 366
"""The furthest a timed opt-out may reach: a year covers any trip; beyond it a clock cannot even print."""
MAX_STORM_WATCH_DAYS = 14
"""The longest storm watch: a storm is forecast days ahead, not months; a longer one is a typo
(a standing floor is the reserve's job)."""
MAX_DEPARTURE_DAYS = 2  # the next HH:MM is at most a day ahead; a day's margin for clocks and time zones
MAX_TIME_TEXT = 64
MAX_PRICE_PER_KWH = 1_000.0
"""The highest threshold taken (program currency per kWh): wholesale price caps stay far below it."""
MAX_PRICE_WH_PER_DAY = 1_000_000.0
"""The most price-driven energy a day may be set to (Wh): several times any pack; a larger one is a typo."""
MAX_PRICE_POWER_W = 1_000_000.0
_HHMM = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)", re.ASCII)


class BadRequest(ValueError):
    """The request cannot be applied; the message says why, for the owner."""


def parse_body(raw: bytes) -> Any:
    """A request's JSON body (empty: null), as every owner API reads it; BadRequest saying what is wrong."""
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply") from None


def _fields(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object with {', '.join(allowed)}, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s) {shown_text(', '.join(map(str, unknown)))} "
                         f"(expected: {', '.join(allowed)})")
    return body


def _percent(body: dict[str, Any], key: str) -> float:
    if key not in body:
        raise BadRequest(f"{key}: missing (a percentage 0 to 100)")
    value = body[key]
    if not is_finite_number(value):
        raise BadRequest(f"{key}: expected a number 0 to 100, got {shown(value)}")
    if not 0 <= value <= 100:
        raise BadRequest(f"{key}: {out_of_range(value, 0, 100)}")
    return plain(value)


def plain(value: float) -> float:
    """`value` as a float, negative zero as 0.0: -0 is in range (it equals 0), but was shown as "-0 %" and
    saved as -0.0."""
    return float(value) + 0.0


def pruned(settings: OwnerSettings, now: float) -> OwnerSettings:
    """Drop an opt-out, departure or storm watch already in the past, so status shows only what still applies
    (each change, and every read of the settings through `desk.OwnerDesk.settings`)."""
    if settings.opt_out_until is not None and settings.opt_out_until <= now:
        settings = replace(settings, opt_out_until=None)
    if settings.departure_at is not None and settings.departure_at <= now:
        settings = replace(settings, departure_at=None, departure_soc_pct=None)
    if settings.storm_watch_until is not None and settings.storm_watch_until <= now:
        settings = replace(settings, storm_watch_floor_pct=None, storm_watch_until=None)
    return settings


def _changed(current: OwnerSettings, now: float, **changes: Any) -> OwnerSettings:
    return pruned(replace(current, received_at=now, **changes), now)


def set_reserve(current: OwnerSettings, body: Any, now: float) -> OwnerSettings:
    """{"pct": N}: the SoC the truck always keeps for driving."""
    return _changed(current, now, reserve_pct=_percent(_fields(body, ("pct",)), "pct"))


def parse_instant(value: Any, tz: dt.tzinfo | None, name: str = "until") -> float:
    """Epoch seconds, or ISO-8601 (a time without an offset is the owner's local time)."""
    if is_finite_number(value):
        return float(value)
    if not isinstance(value, str) or len(value) > MAX_TIME_TEXT:
        raise BadRequest(f"{name}: expected an ISO-8601 time or epoch seconds, got {shown(value)}")
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name}: {shown(value)} is not an ISO-8601 time (e.g. 2025-07-01T18:00)") from None
    if moment.tzinfo is None and tz is not None:
        moment = moment.replace(tzinfo=tz)
    try:
        return moment.timestamp()
    except (ValueError, OverflowError):
        # A valid time the system's clock cannot place (year 1 in local time): long past, or far ahead,
        # which `_ahead` refuses for what it is rather than as a malformed time.
        return -math.inf if moment.year < 1970 else math.inf


def days_ahead(now: float, days: int, tz: dt.tzinfo | None) -> float:
    """The end of "`days` days ahead" of `now`: the later of the same local time `days` calendar days on in
    `tz` (None: the gateway's local time zone) and `days` × 24 h on. Across a daylight-saving change the
    two differ by an hour, and both readings are the owner's: the same time 14 days on (14 × 24 h + 1 h
    across the fall-back night), and 336 h (the longest storm watch MQTT's `ON` asks for, 14 days less an
    hour on the clock across the spring change)."""
    hours = now + days * 86_400
    try:
        return max(hours, (dt.datetime.fromtimestamp(now, tz) + dt.timedelta(days=days)).timestamp())
    except (ValueError, OverflowError, OSError):
        return hours


def _ahead(until: float, raw: Any, now: float, tz: dt.tzinfo | None, limit_days: int = MAX_AHEAD_DAYS,
           hint: str = 'for an opt-out with no end use {"now": true}', name: str = "until") -> float:
    """`until` when it is in the future and within `limit_days` on the owner's calendar: a far-future
    time is a typo, not a plan."""
    if until <= now:
        raise BadRequest(f"{name}: {shown(raw)} is not in the future")
    if until > days_ahead(now, limit_days, tz):
        raise BadRequest(f"{name}: {shown(raw)} is more than {limit_days} days ahead; {hint}")
    return until


def opt_out(current: OwnerSettings, body: Any, now: float, tz: dt.tzinfo | None) -> OwnerSettings:
    """Exactly one of {"now": true} (until revoked), {"event": ID}, {"until": time}."""
    body = _fields(body, ("now", "event", "until"))
    if len(body) != 1:
        raise BadRequest('give exactly one of "now": true, "event": ID or "until": time')
    if "now" in body:
        if body["now"] is not True:
            raise BadRequest(f'now: expected true, got {shown(body["now"])}')
        return _changed(current, now, opt_out_until=math.inf)
    if "event" in body:
        event = _event_id(body["event"])
        if event not in current.opt_out_events and len(current.opt_out_events) >= MAX_OPT_OUT_EVENTS:
            raise BadRequest(f"event: {MAX_OPT_OUT_EVENTS} events are opted out of already; revoke the opt-outs "
                             "(DELETE /api/opt-out, or opt-out off) or opt out until a time instead")
        return _changed(current, now, opt_out_events=current.opt_out_events | {event})
    until = _ahead(parse_instant(body["until"], tz), body["until"], now, tz)
    return _changed(current, now, opt_out_until=until)


def _event_id(raw: Any) -> str:
    """The event id without the spaces around it: a phone keyboard appends one, and "peak " kept as sent
    matches no event "peak" (the truck discharged through an opt-out the owner was told was made)."""
    event = raw.strip() if isinstance(raw, str) else raw
    if not isinstance(event, str) or not event or len(event) > MAX_EVENT_ID or not event.isprintable():
        raise BadRequest(f"event: expected a non-empty event id of at most {MAX_EVENT_ID} printable characters, "
                         f"got {shown(raw)}")
    return event


def revoke_opt_out(current: OwnerSettings, now: float) -> OwnerSettings:
    """Back in: forget every opt-out, timed, open-ended and per-event."""
    return _changed(current, now, opt_out_until=None, opt_out_events=frozenset())


def next_occurrence(hhmm: str, now: float, tz: dt.tzinfo | None) -> float:
    """The first HH:MM on the owner's wall clock strictly after `now` (tz None = system local).

    Steps by calendar day, not by 86,400 s, so a departure set on the eve of a
    daylight-saving change still lands on the wall-clock time the owner meant. A time the
    clocks pass twice (the hour repeated when they fall back) is tried at both passes: at
    the second 01:15 the next 01:20 is five minutes away, not tomorrow's.
    """
    match = _HHMM.fullmatch(hhmm) if isinstance(hhmm, str) else None
    if match is None:
        raise BadRequest(f"time: expected HH:MM (00:00 to 23:59), got {shown(hhmm)}")
    wall = dt.time(int(match[1]), int(match[2]))
    today = dt.datetime.fromtimestamp(now, tz).date()
    for days in (0, 1, 2):
        ahead = [t for t in _passes(today + dt.timedelta(days=days), wall, tz) if t > now]
        if ahead:
            return min(ahead)
    raise AssertionError("unreachable: a wall-clock time recurs within two days")  # pragma: no cover


def _passes(day: dt.date, wall: dt.time, tz: dt.tzinfo | None) -> list[float]:
    """The instants the clock reads `wall` on `day`: two in a repeated hour, otherwise one. A time the
    clocks skip (spring forward) keeps fold=0's reading, the instant after the jump (PEP 495)."""
    first = dt.datetime.combine(day, wall, tzinfo=tz).timestamp()
    second = dt.datetime.combine(day, wall.replace(fold=1), tzinfo=tz).timestamp()
    return [first, second] if second > first else [first]


def set_departure(current: OwnerSettings, body: Any, now: float, tz: dt.tzinfo | None) -> OwnerSettings:
    """{"time": "HH:MM", "soc_pct": N}: be at N % by the next HH:MM on the gateway's clock; or
    {"at": instant, "soc_pct": N}, for a page that worked out the next HH:MM on the owner's own
    clock (a gateway in UTC would read 07:00 as the owner's 03:00 in New York)."""
    body = _fields(body, ("time", "at", "soc_pct"))
    if ("time" in body) == ("at" in body):
        raise BadRequest('give one of time ("HH:MM", the next one) or at (an ISO-8601 instant)')
    if "time" in body:
        at = next_occurrence(body["time"], now, tz)
    else:
        at = _ahead(parse_instant(body["at"], tz, "at"), body["at"], now, tz, MAX_DEPARTURE_DAYS,
                    "a departure is the next time the truck leaves", "at")
    return _changed(current, now, departure_at=at, departure_soc_pct=_percent(body, "soc_pct"))


def clear_departure(current: OwnerSettings, now: float) -> OwnerSettings:
    return _changed(current, now, departure_at=None, departure_soc_pct=None)


def set_storm_watch(current: OwnerSettings, body: Any, now: float, tz: dt.tzinfo | None) -> OwnerSettings:
    """{"floor_pct": N, "until": time}: keep N % for an outage until then (dispatch refused below it,
    charging toward it where the inverter can). Setting it again replaces the one before."""
    body = _fields(body, ("floor_pct", "until"))
    if "until" not in body:
        raise BadRequest('until: missing (when the storm watch ends, ISO-8601, e.g. "2025-07-01T18:00")')
    floor = _percent(body, "floor_pct")
    until = _ahead(parse_instant(body["until"], tz), body["until"], now, tz, MAX_STORM_WATCH_DAYS,
                   "a storm watch lasts at most that long; raise the reserve for a standing floor")
    return _changed(current, now, storm_watch_floor_pct=floor, storm_watch_until=until)


def clear_storm_watch(current: OwnerSettings, now: float) -> OwnerSettings:
    """The storm has passed: back to the reserve (and any departure) alone."""
    return _changed(current, now, storm_watch_floor_pct=None, storm_watch_until=None)


def _bounded(body: dict[str, Any], key: str, lo: float, hi: float, what: str) -> float:
    value = body[key]
    if not is_finite_number(value):
        raise BadRequest(f"{key}: expected {what}, got {shown(value)}")
    if value > hi or value < lo:
        raise BadRequest(f"{key}: {out_of_range(value, lo, hi)}")
    return plain(value)


def set_price_mode(current: OwnerSettings, body: Any, now: float) -> OwnerSettings:
    """{"threshold_per_kwh": N, "max_wh_per_day": N, "kind": "EXPORT_PRICE"|"PRICE", "power_w": N|null}:
    discharge while a published price of that kind is at least N (the program's currency per kWh),
    up to that much energy a day, at that power (null: as much as every limit allows).
    `kind` and `power_w` absent keep the ones set before (at first EXPORT_PRICE, what export is paid, and
    no power limit): the page, which has no power field, no longer undid a limit set elsewhere."""
    body = _fields(body, ("threshold_per_kwh", "max_wh_per_day", "kind", "power_w"))
    for key, what in (("threshold_per_kwh", "the price at or above which the truck discharges"),
                      ("max_wh_per_day", "the most price-driven energy a day, Wh")):
        if key not in body:
            raise BadRequest(f"{key}: missing ({what})")
    threshold = _bounded(body, "threshold_per_kwh", 0, MAX_PRICE_PER_KWH, "a price per kWh, 0 or more")
    # at least 1 Wh and 1 W: a budget or power above 0 that shows as 0 would set a mode that never discharges
    budget = _bounded(body, "max_wh_per_day", 1, MAX_PRICE_WH_PER_DAY, "a number of Wh, 1 or more")
    kind = current.price_kind
    if "kind" in body:
        names = tuple(k.value for k in PriceKind)
        if body["kind"] not in names:
            raise BadRequest(f"kind: expected one of {', '.join(names)}, got {shown(body['kind'])}")
        kind = PriceKind(body["kind"])
    power = current.price_power_w
    if "power_w" in body:
        power = None if body["power_w"] is None else \
            _bounded(body, "power_w", 1, MAX_PRICE_POWER_W, "a power in W, 1 or more, or null")
    return _changed(current, now, price_threshold_per_kwh=threshold, price_max_wh_per_day=budget,
                    price_kind=kind, price_power_w=power)


def clear_price_mode(current: OwnerSettings, now: float) -> OwnerSettings:
    """Price-responsive mode off (the daily maximum, kind and power are kept for the next time it is set)."""
    return _changed(current, now, price_threshold_per_kwh=None)
