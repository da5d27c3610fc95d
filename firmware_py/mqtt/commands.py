"""Owner commands over MQTT: a payload read into an owner change, and the result published back.

A payload is anything a broker delivers: bytes of any size and content, from an
automation, a Home Assistant entity or a stranger with the broker's password. It
is read here into the same requests the owner API takes (docs/command-line.md, owner), then
applied by the caller through `OwnerDesk`, the one path for owner changes (the
rules of `owner/changes.py`, the save, the core, the journal). Whatever the
payload, the answer is one result document; never a traceback.

    P/set/reserve       a number (45, 45.5) or {"pct": N}
    P/set/opt_out       ON (until revoked) | OFF (back in) | {"until": ...} | {"event": ID}
    P/set/storm_watch   {"floor_pct": N, "until": ISO-8601} | OFF | ON ([mqtt] storm_watch_pct
                        for storm_watch_hours: what the Home Assistant switch sends)
    P/set/departure     {"time": "HH:MM", "soc_pct": N} | OFF
    P/set/price         {"threshold_per_kwh": N, "max_wh_per_day": N, "kind": ..., "power_w": ...} | OFF
                        (price-responsive mode, as the owner API's PUT /price: `kind` and
                        `power_w` left out keep the ones set before, `power_w` null lifts the limit)

Commands are also rate limited (`CommandGate`): each accepted change is saved to
disk and journaled, so a publisher looping on a command topic is refused, not
obeyed a thousand times a second.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from firmware_py.clocks import utc_text
from firmware_py.config import MqttConfig
from firmware_py.core.types import OwnerSettings, is_finite_number
from firmware_py.mqtt.topics import Command
from firmware_py.owner.changes import BadRequest
from firmware_py.owner.desk import CONTROLS, Control
from firmware_py.quoting import shown_text

MAX_PAYLOAD_BYTES = 4096
"""As the web app's bodies: larger than any command, small enough to refuse a flood cheaply."""

EXPECTED = {Command.RESERVE: 'a number 0 to 100 (or {"pct": N})',
            Command.OPT_OUT: 'ON, OFF, {"until": ISO-8601} or {"event": ID}',
            Command.STORM_WATCH: 'ON, OFF or {"floor_pct": N, "until": ISO-8601}',
            Command.DEPARTURE: 'OFF or {"time": "HH:MM", "soc_pct": N}',
            Command.PRICE: 'OFF or {"threshold_per_kwh": N, "max_wh_per_day": N}'}
"""What each command takes, as its refusals say."""

CONTROL_PATHS = {Command.RESERVE: "reserve", Command.OPT_OUT: "opt-out",
                 Command.STORM_WATCH: "storm-watch", Command.DEPARTURE: "departure", Command.PRICE: "price"}
"""Each MQTT command and the owner control (`desk.CONTROLS`) it sets."""


@dataclass(frozen=True)
class Change:
    """One command as read from its payload: set its control with `body`, or clear it."""

    command: Command
    body: Any = None
    clear: bool = False

    @property
    def control(self) -> Control:
        path = CONTROL_PATHS[self.command]
        return next(c for c in CONTROLS if c.path == path)


def read(command: Command, payload: bytes, config: MqttConfig, wall_now: float) -> Change:
    """The change a payload asks for; BadRequest saying what was wrong with it."""
    text = _text(payload)
    word = text.upper()
    if word == "OFF" and command is not Command.RESERVE:
        return Change(command, clear=True)
    if word == "ON" and command in (Command.OPT_OUT, Command.STORM_WATCH):
        return Change(command, _switched_on(command, config, wall_now))
    return Change(command, _body(command, _json(command, text)))


def _text(payload: bytes) -> str:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BadRequest(f"payload of {len(payload):,} bytes; at most {MAX_PAYLOAD_BYTES:,} are read")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadRequest("payload is not UTF-8 text") from None
    if not text:
        raise BadRequest("empty payload")
    return text


def _json(command: Command, text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest(f"{command}: expected {EXPECTED[command]}, got {shown_text(text)!r}") from None


def _switched_on(command: Command, config: MqttConfig, wall_now: float) -> Any:
    """What a bare ON means: opting out until revoked, or the configured storm watch from now on."""
    if command is Command.OPT_OUT:
        return {"now": True}
    return {"floor_pct": config.storm_watch_pct, "until": wall_now + config.storm_watch_hours * 3600}


def _body(command: Command, value: Any) -> Any:
    """The owner API's body for a JSON payload (a bare number is the reserve's {"pct": N});
    what the body holds is the owner rules' to judge (`owner/changes.py`)."""
    if command is Command.RESERVE and is_finite_number(value):
        return {"pct": value}
    if not isinstance(value, dict):
        raise BadRequest(f"{command}: expected {EXPECTED[command]}, got {shown_text(json.dumps(value))}")
    return value


# ---------------------------------------------------------------------- results


def result(command: str, ok: bool, reason: str, wall_now: float) -> dict[str, Any]:
    """The document published on P/result (command, ok, reason; the README's topic table)."""
    return {"command": command, "ok": ok, "reason": reason, "at": utc_text(wall_now)}


def done(change: Change, settings: OwnerSettings) -> str:
    """What an applied change did, for the result's reason (settings on the wall clock)."""
    s = settings
    if change.command is Command.RESERVE:
        return f"reserve {s.reserve_pct:g} %"
    if change.command is Command.OPT_OUT:
        if change.clear:
            return "opted back in"
        if isinstance(change.body, dict) and "event" in change.body:  # whatever else is in force: this was asked
            return f"opted out of event {change.body['event']}"
        if s.opt_out_until == math.inf:
            return "opted out until revoked"
        if s.opt_out_until is not None:
            return f"opted out until {utc_text(s.opt_out_until)}"
        return "opted out of " + ", ".join(sorted(s.opt_out_events))
    if change.command is Command.STORM_WATCH:
        if change.clear or s.storm_watch_until is None:
            return "storm watch off"
        return f"storm watch: keeping {s.storm_watch_floor_pct:g} % until {utc_text(s.storm_watch_until)}"
    if change.command is Command.PRICE:
        if change.clear or s.price_threshold_per_kwh is None:
            return "price mode off"
        return (f"price mode: discharging while {s.price_kind.value} >= {s.price_threshold_per_kwh:g} per kWh, "
                f"up to {s.price_max_wh_per_day:,.0f} Wh a day")
    if change.clear or s.departure_at is None:
        return "departure cleared"
    return f"departure {utc_text(s.departure_at)} at {s.departure_soc_pct:g} %"




# ---------------------------------------------------------------------- rate


class CommandGate:
    """A token bucket on the gateway's monotonic clock: `burst` commands at once, then `per_s` a second."""

    def __init__(self, clock: Callable[[], float], burst: int = 10, per_s: float = 1.0) -> None:
        self.clock, self.burst, self.per_s = clock, burst, per_s
        self._tokens, self._at = float(burst), clock()

    def admit(self) -> bool:
        """True when one more command may be applied now (and counts it)."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.per_s)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def refusal(self) -> str:
        return (f"too many commands: at most {self.burst} at once, then {self.per_s:g} a second; "
                "this one was not applied")
