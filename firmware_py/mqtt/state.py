"""The state document on P/state, and when it is worth publishing again.

The document is the status document (`Gateway.status()`: mode, reason, SoC,
floor, reserve, setpoint, power, the event served, faults, links, storm watch, this
month's earnings...)
plus what a home automation needs that the status leaves out:

    "opt_out":   {"active": bool, "until": ISO-8601 | null, "events": [ids]}
                 (active: a general opt-out is in force; until null = until revoked)
    "departure": null | {"at": ISO-8601, "soc_pct": N}
    "delivered": {"event_id": id | null, "event_wh": Wh | null, "total_wh": Wh}
                 (the event served, or the last one; the total since the gateway started)

`Pacer` decides when to publish: at once on a change that matters, and at least
every `publish_interval_s` (link ages and the time move on even when nothing else
does). Numbers that drift (power, energy) matter only past a dead band from what
was last published, so a noisy meter cannot turn the retained topic into a stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from firmware_py.clocks import Clocks, utc_text
from firmware_py.core.tally import Tally
from firmware_py.core.types import OwnerSettings

DEAD_BANDS: dict[tuple[str, ...], float] = {
    ("soc_pct",): 0.5,  # a BMS's SoC flickers by its last digit; every interval still shows it exactly
    ("floor_pct",): 0.1,
    ("setpoint_w",): 100.0,
    ("power_w",): 100.0,
    ("available_wh",): 500.0,  # follows the SoC (0.5 % of a 123 kWh pack is about 600 Wh)
    ("event", "delivered_wh"): 100.0,
    ("delivered", "event_wh"): 100.0,
    ("delivered", "total_wh"): 100.0,
    ("price_mode", "today_wh"): 100.0,  # grows through every price-driven discharge
}
"""Numbers that count as changed only once they moved this far from the last published value."""
IGNORED = frozenset({"at"})
"""Fields that change on every read (the time; link ages are dropped below)."""
MIN_GAP_S = 1.0
"""Never two publications closer than this: a burst of changes is one message a second at most."""


def state_document(status: dict[str, Any], owner: OwnerSettings, tally: Tally, clocks: Clocks,
                   now: float) -> dict[str, Any]:
    """P/state's document: `status` (§3.9) with the owner's opt-out and departure, and delivered energy.

    `owner` is on the core's clock (`now`); instants are shown in UTC.
    """
    return {
        **status,
        "opt_out": _opt_out(owner, clocks, now),
        "departure": _departure(owner, clocks, now),
        "delivered": {"event_id": tally.last_event_id, "event_wh": tally.last_event_wh,
                      "total_wh": tally.total_wh},
    }


def _opt_out(owner: OwnerSettings, clocks: Clocks, now: float) -> dict[str, Any]:
    until = owner.opt_out_until
    active = until is not None and now < until
    shown = utc_text(clocks.to_wall(until)) if active and until is not None and math.isfinite(until) else None
    return {"active": active, "until": shown, "events": sorted(owner.opt_out_events)}


def _departure(owner: OwnerSettings, clocks: Clocks, now: float) -> dict[str, Any] | None:
    if owner.departure_at is None or owner.departure_at <= now:
        return None
    return {"at": utc_text(clocks.to_wall(owner.departure_at)), "soc_pct": owner.departure_soc_pct}


def changed(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    """Whether `after` says something `before` (the last published) did not."""
    if before is None:
        return True
    return _shape(before) != _shape(after) or any(_moved(before, after, path, band)
                                                  for path, band in DEAD_BANDS.items())


def _shape(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without what changes on every read and without the dead-banded numbers."""
    shape = {k: v for k, v in doc.items() if k not in IGNORED}
    shape["links"] = {name: {k: v for k, v in link.items() if k != "age_s"}
                      for name, link in (doc.get("links") or {}).items()}
    for path in (*DEAD_BANDS, ("event", "envelope_from")):  # the envelope's start moves with every reading
        shape = _without(shape, path)
    return shape


def _without(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    head, *rest = path
    if head not in doc:
        return doc
    if not rest:
        return {k: v for k, v in doc.items() if k != head}
    inner = doc[head]
    return {**doc, head: _without(inner, tuple(rest))} if isinstance(inner, dict) else doc


def _value(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _moved(before: dict[str, Any], after: dict[str, Any], path: tuple[str, ...], band: float) -> bool:
    old, new = _value(before, path), _value(after, path)
    if old is None or new is None:
        return old is not new
    return abs(new - old) >= band


@dataclass
class Pacer:
    """When P/state is due: on a change that matters (`changed`), and at least every `interval_s`."""

    interval_s: float
    min_gap_s: float = MIN_GAP_S
    last: dict[str, Any] | None = None
    last_at: float = -math.inf

    def due(self, doc: dict[str, Any], now: float, *, urgent: bool = False) -> bool:
        """True when `doc` should be published at `now` (then `sent` it). `urgent`: an owner's command
        just changed the state; it goes out at once, without waiting for `min_gap_s`."""
        if now - self.last_at < self.min_gap_s and not urgent:
            return False
        return now - self.last_at >= self.interval_s or changed(self.last, doc)

    def sent(self, doc: dict[str, Any], now: float) -> None:
        self.last, self.last_at = doc, now

    def forget(self) -> None:
        """After a reconnect: the next document goes out whatever it says (the broker may have lost it)."""
        self.last, self.last_at = None, -math.inf
