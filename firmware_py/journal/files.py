"""The files one journal is made of, by name: the live segment, its archives, anchors, key and lock.

A journal configured as `journal.sqlite` lives in these files beside each other:

| file | what |
|---|---|
| `journal.sqlite` | the live segment: the one the gateway appends to |
| `journal.000001.sqlite`, `journal.000002.sqlite`, ... | archived segments, oldest first, read-only |
| `journal.sqlite.anchors`, `journal.000001.sqlite.anchors`, ... | each segment's signed checkpoints of its head |
| `journal.sqlite.anchor-key` | the Ed25519 key that signs the anchors (mode 0600) |
| `journal.sqlite.rotating` | a new segment being made (exists only during a rotation) |
| `journal.sqlite.lock` | the lock the one process writing the journal holds, and its pid (`journal/lock.py`) |

Names only: nothing here opens or changes a file, except `remove_all` (which leaves the lock file:
the bench replaces its journal while holding the lock, and a lock on a deleted file keeps no one out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ARCHIVE_DIGITS = 6
ANCHORS_SUFFIX = ".anchors"
KEY_SUFFIX = ".anchor-key"
STATEMENT_KEY_SUFFIX = ".statement-key"
ROTATING_SUFFIX = ".rotating"
LOCK_SUFFIX = ".lock"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass(frozen=True)
class SegmentFile:
    """One segment's file: `number` counts from 1; the live segment is the newest."""

    number: int
    path: Path
    live: bool


def archive_path(live: Path, number: int) -> Path:
    """Where segment `number` of the journal at `live` is kept once rotated out."""
    return live.with_name(f"{live.stem}.{number:0{ARCHIVE_DIGITS}d}{live.suffix}")


def anchors_path(segment: Path) -> Path:
    """The anchor file of one segment (it moves with the segment when that is archived)."""
    return segment.with_name(segment.name + ANCHORS_SUFFIX)


def key_path(live: Path) -> Path:
    return live.with_name(live.name + KEY_SUFFIX)


def statement_key_path(live: Path) -> Path:
    """The key statements of this journal are signed with (`statements/evidence.py`): kept beside it."""
    return live.with_name(live.name + STATEMENT_KEY_SUFFIX)


def rotating_path(live: Path) -> Path:
    return live.with_name(live.name + ROTATING_SUFFIX)


def lock_path(live: Path) -> Path:
    """The lock file beside the journal (`journal/lock.py`): a file of its own, as the live segment
    is replaced by a rotation and the bench's journal is deleted and recreated by each run."""
    return live.with_name(live.name + LOCK_SUFFIX)


def _archive_pattern(live: Path) -> re.Pattern[str]:
    """The name of an archived segment of `live`, its number the one group."""
    return re.compile(rf"{re.escape(live.stem)}\.(\d{{{ARCHIVE_DIGITS}}}){re.escape(live.suffix)}")


def part_of(live: Path, candidate: Path) -> str | None:
    """Which of the journal's files at `live` `candidate` names (None: none of them).

    Names only, as everywhere here: a configuration that puts another file the gateway keeps at one
    of these names would have the journal and that file overwrite each other (`assembly.check`)."""
    if candidate == key_path(live):
        return "the anchor key"
    if candidate == statement_key_path(live):
        return "the statement key"
    if candidate == lock_path(live):
        return "the lock file"
    segment, what = candidate, "a segment"
    if candidate.name.endswith(ANCHORS_SUFFIX):
        segment, what = candidate.with_name(candidate.name[:-len(ANCHORS_SUFFIX)]), "a segment's anchors"
    elif side := next((s for s in SQLITE_SIDE_FILES if candidate.name.endswith(s)), None):
        segment, what = candidate.with_name(candidate.name[:-len(side)]), "a segment's SQLite side file"
    if segment == live and what == "a segment":
        return "the live segment"
    if segment in (live, rotating_path(live)) or (
            segment.parent == live.parent and _archive_pattern(live).fullmatch(segment.name)):
        return what
    return None


def archives(live: Path) -> list[SegmentFile]:
    """The archived segments beside `live`, oldest first (by the number in their name)."""
    pattern = _archive_pattern(live)
    found = []
    folder = live.parent if str(live.parent) else Path(".")
    if not folder.is_dir():
        return []
    for candidate in folder.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and candidate != live:
            found.append(SegmentFile(int(match.group(1)), candidate, live=False))
    return sorted(found, key=lambda s: s.number)


def sqlite_side_files(path: Path) -> list[Path]:
    return [Path(f"{path}{suffix}") for suffix in SQLITE_SIDE_FILES]


def remove_all(live: Path) -> None:
    """Delete every file of the journal at `live` (the bench replaces its own run's journal this way)."""
    segments = [live, *(a.path for a in archives(live)), rotating_path(live)]
    for segment in segments:
        for leftover in (segment, anchors_path(segment), *sqlite_side_files(segment)):
            leftover.unlink(missing_ok=True)
    key_path(live).unlink(missing_ok=True)
