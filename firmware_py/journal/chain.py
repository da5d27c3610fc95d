"""The whole journal: every segment, oldest first, read and checked as one chain.

The live file and the archives beside it (`files.py`) hold one hash chain cut
into segments: each segment after the first opens with a `SegmentStart` naming
the head of the one before. `Chain.check` walks them all, a page at a time:

- each segment's own chain (hashes, seq, the head row: `Journal.check`);
- each segment's anchor file (`anchors.check`): a tail cut back below a signed
  checkpoint, or a record rewritten after one, shows here;
- the links: every segment begins where the one before it ended; a missing
  segment must have been pruned by the retention policy, which the chain records
  (`SegmentPruned`, and carried on in each `SegmentStart`).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_py.errors import InputError
from firmware_py.files import regular_or_absent
from firmware_py.journal import anchors, files
from firmware_py.journal.anchors import Anchor
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.store import Journal, Record, SegmentCheck


@dataclass(frozen=True)
class SegmentReport:
    """One segment as checked: its file, its records and its newest anchor."""

    number: int
    file: str
    records: int
    first_seq: int | None
    last_seq: int
    newest_anchor: Anchor | None
    anchor_lines: int


@dataclass
class ChainReport:
    """The verdict on a whole journal: empty `problems` means intact."""

    problems: list[str] = field(default_factory=list)
    records: int = 0
    segments: list[SegmentReport] = field(default_factory=list)
    pruned_through: int = 0  # segments 1..this were deleted by the retention policy
    head_seq: int = 0
    head_hash: str = ""
    key: str | None = None  # the anchor key's public half, when readable here
    key_checked: bool = False  # the newest anchor's signature was checked against that key

    @property
    def newest_anchor(self) -> Anchor | None:
        return self.segments[-1].newest_anchor if self.segments else None


class Chain:
    """A journal's segments, opened read-only one at a time."""

    def __init__(self, live: str | Path):
        self.live = Path(live)
        if not self.live.exists():
            raise InputError(f"{self.live}: no such journal file")
        problem = regular_or_absent(self.live, "journal")
        if problem:
            raise InputError(problem)
        with Journal.open(self.live, readonly=True):
            pass  # a file that is not a journal is bad input before anything is printed

    def segment_files(self) -> list[files.SegmentFile]:
        with Journal.open(self.live, readonly=True) as live:
            number = live.segment
        return [a for a in files.archives(self.live) if a.number < number] + \
            [files.SegmentFile(number, self.live, live=True)]

    def oldest_held(self) -> Record | None:
        """The first record of the oldest segment still here (after any the retention policy pruned)."""
        with Journal.open(self.segment_files()[0].path, readonly=True) as journal:
            return next(journal.iter_records(), None)

    def iter_records(self, kinds: Collection[RecordKind | str] | None = None) -> Iterator[Record]:
        """Every record of every segment, oldest first, a page at a time."""
        for segment in self.segment_files():
            with Journal.open(segment.path, readonly=True) as journal:
                yield from journal.iter_records(kinds)

    def check(self) -> ChainReport:
        """Every segment's chain and anchors, and the links between segments: all problems at once."""
        report = ChainReport(key=anchors.readable_public_key(files.key_path(self.live)))
        live = self.segment_files()[-1].number
        report.problems += [f"{a.path.name}: an archive numbered after the live segment ({live}): not part of "
                            "this chain (renamed or planted)" for a in files.archives(self.live) if a.number >= live]
        checked: list[tuple[files.SegmentFile, SegmentCheck]] = []
        pruned: dict[str, Any] | None = None
        for segment in self.segment_files():
            with Journal.open(segment.path, readonly=True) as journal:
                anchored_upto = anchors.size(files.anchors_path(segment.path))  # before the records, as they were
                result = journal.check()
                report.problems += result.problems
                if journal.segment != segment.number:
                    report.problems.append(f"{segment.path.name}: holds segment {journal.segment}, "
                                           f"not {segment.number} (renamed?)")
                report.problems += self._anchor_problems(report, segment, journal, result, anchored_upto)
                pruned = _newer_pruning(pruned, journal.pruned_through())
            report.records += result.records
            checked.append((segment, result))
        report.problems += _link_problems(checked, pruned)
        report.pruned_through = int((pruned or {}).get("segment") or 0)
        last = checked[-1][1]
        report.head_seq, report.head_hash = last.last_seq, last.last_hash
        return report

    def _anchor_problems(self, report: ChainReport, segment: files.SegmentFile, journal: Journal,
                         result: SegmentCheck, anchored_upto: int) -> list[str]:
        path = files.anchors_path(segment.path)
        verdict = anchors.check(path, segment.number, journal.hash_at, result.last_seq, report.key, anchored_upto)
        report.segments.append(SegmentReport(segment.number, segment.path.name, result.records, result.first_seq,
                                             result.last_seq, verdict.newest, verdict.lines))
        if segment.live:
            report.key_checked = verdict.key_checked
        # The file's own version says whether it is anchored, but nothing signs that number: an anchor key
        # beside the journal says so too, so setting the version back cannot excuse a deleted anchor file.
        expected = journal.anchored or files.key_path(self.live).exists()
        if verdict.lines == 0 and expected:  # the writer anchors seq 0 as it opens: never a segment without one
            missing = f"{path.name}: missing or empty, though segment {segment.number} " + \
                ("holds records" if result.records else "was anchored (its records were deleted too?)")
            return [f"{missing} (its anchor file was deleted)"]
        return verdict.problems


def _newer_pruning(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if b is None or not isinstance(b.get("segment"), int):
        return a
    if a is None or b["segment"] > a["segment"]:
        return b
    return a


def _link_problems(checked: list[tuple[files.SegmentFile, SegmentCheck]], pruned: dict[str, Any] | None) -> list[str]:
    """Each segment begins where the one before ended; a gap is only what retention pruned."""
    problems: list[str] = []
    first_file, first = checked[0]
    if first_file.number > 1:
        recorded = pruned or {}
        proven = recorded.get("segment", 0) >= first_file.number - 1
        if recorded.get("segment") == first_file.number - 1:  # the pruned head is where this segment begins
            previous = (first.start or {}).get("previous") or {}
            proven = _tail(recorded) == _tail(previous)
        if not proven:
            problems.append(f"segments 1..{first_file.number - 1}: missing, and the chain does not record "
                            "pruning them (deleted outside the retention policy)")
    for (before_file, before), (after_file, after) in itertools.pairwise(checked):
        if after_file.number != before_file.number + 1:
            problems.append(f"segments {before_file.number + 1}..{after_file.number - 1}: missing (deleted)")
            continue
        if _tail((after.start or {}).get("previous") or {}) != (before.last_seq, before.last_hash):
            problems.append(f"{after_file.path.name}: does not continue {before_file.path.name} "
                            f"(which ends at record {before.last_seq}; a segment was replaced or cut back)")
    return problems


def _tail(mark: dict[str, Any]) -> tuple[Any, Any]:
    """(last seq, last hash) of a segment as a `previous` or pruning mark names it."""
    return mark.get("last_seq"), mark.get("last_hash")
