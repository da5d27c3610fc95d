"""A journal of any length, built fast: valid chained rows written with batched inserts.

The journal is one file as a gateway before segments and anchors left it (schema
version 1): the flood of the hardening issue, which the new gateway must open,
rotate and anchor without reading it whole.

Appending a million records one by one through `Journal.append` would take minutes;
the memory tests need the file, not the path that wrote it. Every row here is what
`Journal.append` would have written (same canonical payload text, same hash), so
`verify` finds the chain intact and the gateway reads it as its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from firmware_py.core import types as t
from firmware_py.journal import Journal, codec, files
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.store import GENESIS_HASH, record_hash

OPEN_EVENT = "flooded-peak"
CHUNK = 20_000


def _rows(count: int, start_at: float) -> Iterator[tuple[str, float, str]]:
    """(kind, at, payload text): a flood of refused SunSpec writes around one event left open."""
    opening = [t.DispatchRequest(OPEN_EVENT, "sunspec", t.DispatchKind.DISCHARGE, 4000, start_at, start_at + 14_400,
                                 start_at),
               t.DispatchAnswer.accepted(OPEN_EVENT, start_at)]
    for item in opening:
        yield str(RecordKind.of(item)), codec.event_time(item), codec.canonical(codec.jsonable(item))
    for i in range(count - len(opening)):
        at = start_at + i * 0.01
        if i % 5_000 == 4_999:
            energy = t.EventEnergy(at, OPEN_EVENT, round(i * 0.001, 3), round(i * 0.001, 3),
                                   meter_total_wh=10_000 + round(i * 0.001, 3))
            yield str(RecordKind.EVENT_ENERGY), at, codec.canonical(codec.jsonable(energy))
            continue
        yield str(RecordKind.SUNSPEC_WRITE_REFUSED), at, _note_text(i)


def _note(i: int) -> dict:
    return {"client": f"192.168.1.{i % 250}", "function": 6, "register": 40_000 + i % 700, "count": 1,
            "exception": "ILLEGAL_ADDRESS", "reason": "unit 2 is not this DER (refused by the Modbus layer)"}


def _note_text(i: int) -> str:
    """`codec.canonical(_note(i))`, spelled out: a million of them through the generic walk take seconds."""
    return (f'{{"client":"192.168.1.{i % 250}","count":1,"exception":"ILLEGAL_ADDRESS","function":6,'
            f'"reason":"unit 2 is not this DER (refused by the Modbus layer)","register":{40_000 + i % 700}}}')


def build(path: Path, count: int, *, start_at: float = 1_700_000_000.0, wall: float = 1_700_000_000.0) -> str:
    """Write a journal of `count` records at `path` (a new file); returns the head hash."""
    assert all(_note_text(i) == codec.canonical(_note(i)) for i in (0, 1, 999))
    Journal.open(path).close()  # the schema and markers, exactly as the gateway creates them
    files.key_path(path).unlink()
    files.anchors_path(path).unlink()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")  # a test fixture: durability is not what is measured
    seq, prev = 0, GENESIS_HASH
    batch: list[tuple] = []
    conn.execute("BEGIN")
    for kind, at, text in _rows(count, start_at):
        seq += 1
        digest = record_hash(prev, seq, at, wall, kind, text)
        batch.append((seq, at, wall, kind, text, prev, digest))
        prev = digest
        if len(batch) >= CHUNK:
            conn.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?)", batch)
            batch.clear()
    conn.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?)", batch)
    conn.execute("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
    conn.execute("COMMIT")
    conn.execute("PRAGMA user_version = 1")  # as a gateway before anchors left it: no anchor file to match
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return prev
