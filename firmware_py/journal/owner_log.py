"""The owner's and the installer's changes as the journal tells them, for `report` and the web app.

Every owner change (reserve, opt-out, departure, storm watch, price mode), whether made with
the `owner` command, the web app or a script, reaches the core as an
`OwnerSettings` input, and every lockout reset as an `InstallerReset`; the
gateway journals both. This reads them back in words. Instants inside a record
are on the core's clock; each is shown on the wall clock of its own record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from firmware_py.journal.codec import time_text
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.store import Record

OWNER_KINDS = frozenset({RecordKind.OWNER_SETTINGS, RecordKind.INSTALLER_RESET})


@dataclass(frozen=True)
class OwnerChange:
    """One change: when (wall time), its journal seq, what kind of record, and what it set."""

    at: float
    seq: int
    kind: str
    text: str


def owner_changes(records: Iterable[Record]) -> list[OwnerChange]:
    """The owner's and installer's changes among `records`, in journal order."""
    return [OwnerChange(r.wall, r.seq, str(r.kind), describe(r)) for r in records if r.kind in OWNER_KINDS]


def describe(record: Record) -> str:
    """One line for an `OwnerSettings` or `InstallerReset` record."""
    if record.kind == RecordKind.INSTALLER_RESET:
        return "installer reset (clears a lockout)"
    return "owner settings: " + settings_text(record.payload, record.on_wall)


def settings_text(p: dict[str, Any], on_wall: Any = lambda at: at) -> str:
    """The settings an `OwnerSettings` payload holds, in words (`on_wall` moves its instants to wall time)."""
    parts = [f"reserve {_num(p.get('reserve_pct'))} %"]
    until = p.get("opt_out_until")
    if until == "inf":
        parts.append("opted out until revoked")
    elif until is not None:
        parts.append(f"opted out until {time_text(on_wall(float(until)))}")
    if p.get("opt_out_events"):
        parts.append("opted out of " + ", ".join(map(str, p["opt_out_events"])))
    if p.get("departure_at") is not None:
        parts.append(f"departure {time_text(on_wall(float(p['departure_at'])))} at {_num(p.get('departure_soc_pct'))} %")
    if p.get("storm_watch_until") is not None:
        parts.append(f"storm watch {_num(p.get('storm_watch_floor_pct'))} % until "
                     f"{time_text(on_wall(float(p['storm_watch_until'])))}")
    if p.get("price_threshold_per_kwh") is not None and p.get("price_max_wh_per_day"):
        parts.append(f"price mode {p.get('price_kind')} >= {_num(p['price_threshold_per_kwh'])} per kWh, "
                     f"up to {_num(p['price_max_wh_per_day'])} Wh a day")
    return ", ".join(parts)


def _num(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return "?"


