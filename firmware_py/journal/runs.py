"""Which software wrote a journal: each run's release, and each upgrade of the file's schema.

Every run begins with a core start (`CoreStart`), which names the software that ran it
from journal schema 3 on; a run from before names none (`software_version` is None).
A file upgraded from an older schema holds a `SchemaUpgraded` record where that happened.
Both are read through the kind index, so this costs the number of runs, not the journal's length.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from firmware_py.journal.kinds import RecordKind

KINDS = (RecordKind.CORE_START, RecordKind.SCHEMA_UPGRADED)


@dataclass(frozen=True)
class Run:
    seq: int
    wall: float
    software_version: str | None


@dataclass(frozen=True)
class Upgrade:
    seq: int
    wall: float
    from_version: Any
    to_version: Any
    software_version: Any


def runs_and_upgrades(records: Iterable[Any]) -> tuple[list[Run], list[Upgrade]]:
    """From records of `KINDS` (others are passed over), oldest first."""
    runs: list[Run] = []
    upgrades: list[Upgrade] = []
    for record in records:
        payload = record.payload
        if record.kind == RecordKind.CORE_START:
            version = payload.get("software_version")
            runs.append(Run(record.seq, record.wall, version if isinstance(version, str) else None))
        elif record.kind == RecordKind.SCHEMA_UPGRADED:
            upgrades.append(Upgrade(record.seq, record.wall, payload.get("from_version"), payload.get("to_version"),
                                    payload.get("software_version")))
    return runs, upgrades


def software_line(runs: list[Run], upgrades: list[Upgrade]) -> str | None:
    """One line for people: the releases that ran, in order, and the schema upgrades (None: no run)."""
    if not runs and not upgrades:
        return None
    parts = []
    for version, same in groupby(runs, key=lambda run: run.software_version):
        group = list(same)
        name = version if version is not None else "not named (before journal schema 3)"
        parts.append(f"{name} × {len(group)} from record {group[0].seq}")
    line = "software: " + (", ".join(parts) or "no run")
    for upgrade in upgrades:
        line += (f"; journal schema {upgrade.from_version} -> {upgrade.to_version} at record {upgrade.seq} "
                 f"by {upgrade.software_version}")
    return line
