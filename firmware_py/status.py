"""`powershare-gw status`: the live state of the running gateway, for people and scripts.

One document, built here from the core's read model (`Telemetry`) and the link
book, served by the running gateway at `GET /api/status` on its owner API
(loopback or a Unix socket, bearer token) and printed by this command as text
or `--json`. Its fields are the contract's status fields (mode, reason, SoC,
floor, reserve, setpoint and measured power, the event served, latched faults,
each link with the age of its last good data, storm watch) plus a few more, among them
this month's earnings (`earnings`: the month's statement totals, computed by the
statement's own code off the event loop, with the journal record they go up to).

Exit codes (the contract): 0 printed, 2 the gateway cannot be reached (not
running, wrong address, token not accepted, or what answers sends a document that
cannot be shown: a field of the wrong type) or the configuration is bad.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from firmware_py.clocks import utc_text
from firmware_py.core.telemetry import Telemetry
from firmware_py.narration import LAST_READING, percent
from firmware_py.quoting import printable

if TYPE_CHECKING:
    from firmware_py.config import OwnerConfig

STATUS_KEYS = ("at", "mode", "reason")
"""What every gateway's status document holds: an answer without them is not a gateway's."""


class Unrenderable(ValueError):
    """A field of the status document that is not what a gateway sends (`"power_w": "lots"`): the answer
    is unusable, as any other bad peer's (exit 2 naming the field), never a traceback (exit 1)."""

    def __init__(self, field: str, value: Any) -> None:
        super().__init__(f"its field {field} is {printable(repr(value))[:60]}")


def _number(value: Any, field: str) -> float:
    """`value` as a number to format, or Unrenderable naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unrenderable(field, value)
    return value


def _optional(value: Any, field: str) -> float | None:
    """`value` as a number to format, None (not known) kept, or Unrenderable naming `field`."""
    return None if value is None else _number(value, field)


def _part(value: Any, field: str) -> dict[str, Any] | None:
    """An object of the document (None when absent or empty), or Unrenderable naming `field`."""
    if not value:
        return None
    if not isinstance(value, dict):
        raise Unrenderable(field, value)
    return value


CORE_LINKS = ("bms", "inverter")
"""Always shown, even before their first report: without them the gateway cannot command power."""


def status_document(t: Telemetry, links: dict[str, dict[str, Any]], wall_now: float,
                    earnings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status fields from the core's read model and the links' health (see the module docstring);
    `earnings`: this month's, as the statement's code last computed them (`statements.earnings`)."""
    event = None
    if t.active_event_id is not None:
        event = {"id": t.active_event_id, "answer": t.verdict.value if t.verdict is not None else None,
                 "cap_w": t.cap_w, "delivered_wh": t.meter_wh,
                 # when the floor's envelope starts to reduce the power served (at the power it runs at)
                 "envelope_from": utc_text(wall_now + t.envelope_in_s) if t.envelope_in_s is not None else None}
    shown = {name: {"ok": False, "age_s": None} for name in CORE_LINKS}
    shown.update(links)
    return {
        "at": utc_text(wall_now),
        "mode": t.mode.value,
        "reason": t.reason,
        # every digit the BMS sends, without a binary float's tail (79.6, not 79.60000000000001)
        "soc_pct": round(t.soc_pct, 6) if t.soc_pct is not None else None,
        "floor_pct": round(t.floor_pct, 3),
        "reserve_pct": t.reserve_pct,
        "setpoint_w": round(t.setpoint_w, 1),
        "power_w": round(t.shown_power_w, 1),
        "available_wh": round(t.available_wh, 1),
        "event": event,
        "faults": [str(kind) for kind in t.faults],
        "links": shown,
        # whether soc_pct and power_w are readings of now, as the core judges its data: a reader must
        # not show the last reading of a silent BMS or inverter as live
        "fresh": {"bms": t.bms_fresh, "inverter": t.inverter_fresh},
        "storm_watch": _storm_watch(t, wall_now),
        # price-responsive mode while it is on: what it follows and today's price-driven energy
        "price_mode": {"threshold_per_kwh": t.price_threshold_per_kwh, "kind": t.price_kind,
                       "max_wh_per_day": t.price_max_wh_per_day, "today_wh": t.price_day_wh}
        if t.price_threshold_per_kwh is not None else None,
        "resyncing": t.resyncing,
        "journal_ok": t.journal_ok,
        # why new dispatch would not be followed now (null: nothing blocks it), and the site limit in force
        "dispatch_blocked": {"reason": t.refusal.value, "detail": t.refusal_detail} if t.refusal else None,
        "site_limit_w": t.site_limit_w,
        "earnings": earnings,
    }


def _storm_watch(t: Telemetry, wall_now: float) -> dict[str, Any] | None:
    """`{floor_pct, until}` (until in UTC) while a storm watch lasts, else None."""
    if t.storm_watch_pct is None or t.storm_watch_until is None:
        return None
    return {"floor_pct": t.storm_watch_pct, "until": utc_text(wall_now + (t.storm_watch_until - t.at))}


def render(doc: dict[str, Any]) -> list[str]:
    """The document as lines for a person: rounded as people read them (`--json` keeps every digit).
    Unrenderable when a field it formats has the wrong type."""
    event = _part(doc.get("event"), "event")
    if event:
        cap_w = _optional(event.get("cap_w"), "event.cap_w")
        cap = f", capped to {cap_w:,.0f} W" if cap_w is not None else ""
        delivered = _optional(event.get("delivered_wh"), "event.delivered_wh")
        energy = f"{delivered:,.1f} Wh delivered" if delivered is not None else "nothing delivered yet"
        envelope = f", the floor's envelope reduces power from {event['envelope_from']}" \
            if event.get("envelope_from") else ""
        served = f"{event.get('id')}: {event.get('answer')}{cap}, {energy}{envelope}"
    else:
        served = "none"
    lines = [
        f"at:      {doc.get('at')}",
        f"mode:    {doc.get('mode')}: {doc.get('reason')}",
        f"SoC:     {_percent(doc, 'soc_pct')}{_unless_fresh(doc, 'bms')} (floor {_percent(doc, 'floor_pct')}, "
        f"reserve {_percent(doc, 'reserve_pct')})",
        f"power:   {_number(doc.get('power_w', 0), 'power_w'):,.0f} W measured{_unless_fresh(doc, 'inverter')}, "
        f"setpoint {_number(doc.get('setpoint_w', 0), 'setpoint_w'):,.0f} W",
        f"event:   {served}",
        f"faults:  {', '.join(str(fault) for fault in _list(doc.get('faults'), 'faults')) or 'none'}",
        f"storm:   {_storm(_part(doc.get('storm_watch'), 'storm_watch'))}",
        f"earned:  {_earnings(_part(doc.get('earnings'), 'earnings'))}",
        "links:   " + "; ".join(_link(name, _part(link, f"links.{name}") or {})
                                for name, link in (_part(doc.get("links"), "links") or {}).items()),
    ]
    blocked = _part(doc.get("dispatch_blocked"), "dispatch_blocked")
    if blocked:
        lines.append(f"dispatch: not followed now: {blocked.get('reason')}: {blocked.get('detail')}")
    price = _part(doc.get("price_mode"), "price_mode")
    if price:
        threshold = _number(price.get("threshold_per_kwh"), "price_mode.threshold_per_kwh")
        today, most = (_number(price.get(key), f"price_mode.{key}") for key in ("today_wh", "max_wh_per_day"))
        lines.append(f"price:   discharging while {price.get('kind')} >= {threshold:g} per kWh; "
                     f"{today:,.0f} of {most:,.0f} Wh today")
    if doc.get("resyncing"):
        lines.append("resync:  the gateway stalled; holding 0 W until fresh BMS and inverter data")
    if not doc.get("journal_ok", True):
        lines.append("journal: FAILING (new dispatch is refused until it writes again)")
    return lines


def _unless_fresh(doc: dict[str, Any], source: str) -> str:
    """A note after a figure whose source (`bms`, `inverter`) has no fresh data: the figure is its last reading
    (nothing, from a gateway too old to say)."""
    fresh = _part(doc.get("fresh"), "fresh") or {}
    return LAST_READING if fresh.get(source) is False else ""


def _percent(doc: dict[str, Any], field: str) -> str:
    return percent(_optional(doc.get(field), field))


def _list(value: Any, field: str) -> list[Any]:
    """A list of the document (empty when absent), or Unrenderable naming `field`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unrenderable(field, value)
    return value


def _earnings(earnings: dict[str, Any] | None) -> str:
    if not earnings:
        return "not computed yet (the month's figures follow once the journal has been read)"
    cur = earnings.get("currency", "")
    served = _number(earnings.get("events_served", 0), "earnings.events_served")
    credit, credited_wh, wear, net = (_number(earnings.get(key, 0), f"earnings.{key}")
                                      for key in ("credit", "credited_wh", "wear_cost", "net"))
    return (f"{earnings.get('month')}: credit {credit:,.2f} {cur} for "
            f"{credited_wh / 1000:,.2f} kWh credited in {served} event{'s' * (served != 1)}, "
            f"wear {wear:,.2f} {cur}, net {net:,.2f} {cur}")


def _storm(storm: dict[str, Any] | None) -> str:
    if not storm:
        return "no storm watch"
    return f"storm watch: keeping {_percent(storm, 'floor_pct')} for an outage until {storm.get('until')}"


def _link(name: str, link: dict[str, Any]) -> str:
    age = _optional(link.get("age_s"), f"links.{name}.age_s")
    when = "no data yet" if age is None else f"last good {age:.1f} s ago"
    if link.get("ok"):
        return f"{name} ok ({when})"
    cause = f": {link['cause']}" if link.get("cause") else ""
    return f"{name} DOWN ({when}){cause}"


def fetch_status(owner: OwnerConfig, answer_s: float | None = None, token: str | None = None) -> dict[str, Any]:
    """The running gateway's status document; NotAnOwnerApi when what answers is not a gateway (one
    test of "is this a gateway", shared by `status` and `commission`). `token` as `call` takes it."""
    from firmware_py.owner.commands import CONNECT_TIMEOUT_S, call

    return call(owner, "GET", "/api/status", wants=STATUS_KEYS, answer_s=answer_s or CONNECT_TIMEOUT_S, token=token)


def _status_command(args: argparse.Namespace) -> int:
    from firmware_py import config
    from firmware_py.errors import InputError
    from firmware_py.owner.access import parse_listen
    from firmware_py.owner.commands import Unavailable

    owner = config.load(args.config).owner
    try:
        doc = fetch_status(owner)
    except Unavailable as err:
        raise InputError(f"status: {err}") from None
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        try:
            lines = render(doc)
        except Unrenderable as err:
            raise InputError(f"status: what answers on {parse_listen(owner.api_listen).describe()} is not a "
                             f"powershare-gw owner API ({err})") from None
        print("\n".join(printable(line) for line in lines))  # ids and causes come from aggregators
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="the running gateway's live state: mode, SoC, power, event, faults, links")
    p.add_argument("--config", required=True, help="the running gateway's TOML configuration ([owner] api_listen "
                                                   "and token_file)")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.set_defaults(handler=_status_command)
