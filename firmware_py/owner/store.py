"""The owner's settings on disk, so a restart keeps the reserve the owner chose.

The file is JSON, replaced atomically (temp file, fsync, rename, fsync of the
directory): a power cut mid-write leaves the old settings or the new ones,
never half of each. A file that cannot be read is an error, never a silent
reset to defaults, because the reserve is what keeps the truck drivable.

Times in the file (and in the owner API) are wall time, UTC epoch seconds: the
core's monotonic clock starts afresh at every boot. `on_clock` moves settings
between the two at the boundary (`firmware_py/clocks.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from firmware_py.core.types import OwnerSettings, PriceKind, is_finite_number
from firmware_py.errors import InputError
from firmware_py.files import read_text, write_atomically
from firmware_py.owner.changes import plain
from firmware_py.quoting import out_of_range, shown

FORMAT_VERSION = 3
"""1: reserve, opt-out, departure. 2: and the storm watch. 3: and price-responsive mode.
Every older version is still read."""
READABLE_VERSIONS = (1, 2, 3)
UNTIL_REVOKED = "until_revoked"
"""How `opt_out_until = math.inf` is written: JSON has no infinity."""

MAX_INSTANT = 253_402_300_799.0
"""9999-12-31T23:59:59Z: the last instant a clock can print; a saved time beyond it is corrupt."""

_FIELDS = ("version", "reserve_pct", "received_at", "opt_out_until", "opt_out_events",
           "departure_at", "departure_soc_pct", "storm_watch_floor_pct", "storm_watch_until",
           "price_threshold_per_kwh", "price_max_wh_per_day", "price_kind", "price_power_w")


def on_clock(settings: OwnerSettings, convert: Callable[[float], float]) -> OwnerSettings:
    """The same settings with every instant converted (`Clocks.to_core` or `Clocks.to_wall`)."""
    def moved(at: float | None) -> float | None:
        return None if at is None else convert(at)

    return replace(settings, received_at=convert(settings.received_at),
                   opt_out_until=moved(settings.opt_out_until), departure_at=moved(settings.departure_at),
                   storm_watch_until=moved(settings.storm_watch_until))


def encode(settings: OwnerSettings) -> dict[str, Any]:
    """Settings as a JSON-ready object (the file format and the API's view)."""
    until = settings.opt_out_until
    return {
        "version": FORMAT_VERSION,
        "reserve_pct": settings.reserve_pct,
        "received_at": settings.received_at,
        "opt_out_until": UNTIL_REVOKED if until == math.inf else until,
        "opt_out_events": sorted(settings.opt_out_events),
        "departure_at": settings.departure_at,
        "departure_soc_pct": settings.departure_soc_pct,
        "storm_watch_floor_pct": settings.storm_watch_floor_pct,
        "storm_watch_until": settings.storm_watch_until,
        "price_threshold_per_kwh": settings.price_threshold_per_kwh,
        "price_max_wh_per_day": settings.price_max_wh_per_day,
        "price_kind": settings.price_kind.value,
        "price_power_w": settings.price_power_w,
    }


def _number(data: dict[str, Any], key: str, lo: float = -math.inf, hi: float = math.inf,
            optional: bool = False) -> float | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not is_finite_number(value):
        raise ValueError(f"{key}: expected a number, got {shown(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"{key}: {out_of_range(value, lo, hi)}")
    return plain(value)  # a -0.0 saved before it was refused reads as 0.0 (not "-0 %")


def decode(data: Any) -> OwnerSettings:
    """The inverse of `encode`; ValueError names the first field that is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    version = data.get("version", FORMAT_VERSION)
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError(f"version: expected one of {', '.join(map(str, READABLE_VERSIONS))}, got {version!r}")
    if "reserve_pct" not in data:
        raise ValueError("reserve_pct: missing")
    until = data.get("opt_out_until")
    if until != UNTIL_REVOKED:
        until = _number(data, "opt_out_until", -MAX_INSTANT, MAX_INSTANT, optional=True)
    events = data.get("opt_out_events", [])
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ValueError(f"opt_out_events: expected a list of event ids, got {events!r}")
    departure_at = _number(data, "departure_at", -MAX_INSTANT, MAX_INSTANT, optional=True)
    departure_soc = _number(data, "departure_soc_pct", 0, 100, optional=True)
    if (departure_at is None) != (departure_soc is None):
        raise ValueError("departure_at and departure_soc_pct must be set together")
    storm_floor = _number(data, "storm_watch_floor_pct", 0, 100, optional=True)
    storm_until = _number(data, "storm_watch_until", -MAX_INSTANT, MAX_INSTANT, optional=True)
    if (storm_floor is None) != (storm_until is None):
        raise ValueError("storm_watch_floor_pct and storm_watch_until must be set together")
    kind = data.get("price_kind", PriceKind.EXPORT_PRICE.value)
    if kind not in tuple(k.value for k in PriceKind):
        raise ValueError(f"price_kind: expected one of {', '.join(k.value for k in PriceKind)}, got {shown(kind)}")
    return OwnerSettings(
        reserve_pct=_number(data, "reserve_pct", 0, 100),
        received_at=_number(data, "received_at") if "received_at" in data else 0.0,
        opt_out_until=math.inf if until == UNTIL_REVOKED else until,
        opt_out_events=frozenset(events),
        departure_at=departure_at,
        departure_soc_pct=departure_soc,
        storm_watch_floor_pct=storm_floor,
        storm_watch_until=storm_until,
        price_threshold_per_kwh=_number(data, "price_threshold_per_kwh", 0, math.inf, optional=True),
        price_max_wh_per_day=_number(data, "price_max_wh_per_day", 0, math.inf, optional=True) or 0.0,
        price_kind=PriceKind(kind),
        price_power_w=_number(data, "price_power_w", 0, math.inf, optional=True),
    )


class OwnerStore:
    """One settings file; `load` at start-up, `save` on every accepted change."""

    def __init__(self, path: str | Path, defaults_reserve_pct: float) -> None:
        self.path = Path(path)
        self.defaults_reserve_pct = defaults_reserve_pct

    def load(self, now: float = 0.0) -> OwnerSettings:
        """The saved settings, or the configured reserve when nothing was saved yet.

        A saved reserve wins over the config's: the config holds the installer's
        default, the file holds what the owner asked for since.
        """
        try:
            text = read_text(self.path, "owner settings file")
        except FileNotFoundError:
            return OwnerSettings(reserve_pct=self.defaults_reserve_pct, received_at=now)
        try:
            return decode(json.loads(text))
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError; deep nesting recurses
            raise InputError(
                f"{self.path}: corrupt owner settings ({err}); the owner's reserve is not reset "
                f"silently: fix the file, or delete it to return to the configured reserve "
                f"{self.defaults_reserve_pct:g} %") from None

    def save(self, settings: OwnerSettings) -> None:
        """Replace the file atomically and durably; OSError reaches the caller."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(encode(settings), indent=2) + "\n", new_mode=0o600)
