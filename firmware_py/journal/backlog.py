"""What waits to be written to the journal, and the bound that keeps it finite while writes fail.

Each core step queues its records here and the gateway writes them every 0.2 s. While the journal
fails (a full disk, an I/O error, a lock) they stay queued so that nothing is lost: every input
that shaped a decision and every decision waits, however long, until it can be written. Those
come at the pace of events and requests. Two kinds come at the pace of time alone: a batch of
core steps a minute (for replay) and a history sample a minute (for the owner's chart). A
failure that lasted days would let them fill the gateway's memory (about 0.5 MB an hour), and a
gateway killed for its memory loses the whole queue. So past a bound of each, the newer ones are
not queued; in their place goes one `JournalGap` record saying how many of which, and between
which instants, so a replay stops there knowingly and the chart shows a hole rather than a lie.
The oldest are the ones kept: they continue the replayable run up to the gap.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from firmware_py.journal.kinds import RecordKind

log = logging.getLogger(__name__)

BOUNDS: Mapping[RecordKind, int] = {RecordKind.CORE_STEPS: 60, RecordKind.SAMPLE: 1_440}
"""The most of each kind kept queued: an hour of core steps in `run` (a batch a minute, about
0.5 MB), a day of history samples at the default interval (about 0.2 MB)."""

Item = Any
"""A queued item: a core event or input, or a note as (kind, at, payload)."""


class Backlog:
    """The journal's queue, in order. Every item is kept except the bounded kinds past their bound."""

    def __init__(self, bounds: Mapping[RecordKind, int] = BOUNDS):
        self.bounds = dict(bounds)
        self._items: list[Item] = []
        self._queued: Counter[RecordKind] = Counter()
        """How many of each bounded kind are queued or in a write not yet known to have succeeded."""
        self._gap: dict[str, Any] | None = None
        """The payload of the gap the dropped items of this queue are counted in (None: nothing dropped)."""
        self._warned = False
        """Whether this failure's drops were logged (once per failure, not once per failed write)."""

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Item) -> None:
        self._items.append(item)

    def extend(self, items: Iterable[Item]) -> None:
        self._items.extend(items)

    def add_note(self, kind: RecordKind, at: float, payload: dict[str, Any]) -> None:
        """Queue a note; of a bounded kind, only while fewer than its bound wait (else counted in the gap)."""
        bound = self.bounds.get(kind)
        if bound is None:
            self._items.append((kind, at, payload))
        elif self._queued[kind] < bound:
            self._queued[kind] += 1
            self._items.append((kind, at, payload))
        else:
            self._count_dropped(kind, at, payload)

    def take(self) -> list[Item]:
        """Everything queued, in order, for one write; the queue starts afresh.

        The taken items still count against the bounds (they are in flight) until `written` says the
        write succeeded: while a failing write waits on the journal's busy timeout, what is queued
        meanwhile must not start from zero, or the bound would never hold across failed writes.
        The gap taken with it is closed: what is dropped from now on is counted in a new one, so a
        payload in the writer's hands is never changed under it."""
        items, self._items = self._items, []
        self._gap = None
        return items

    def written(self, items: list[Item]) -> None:
        """A write succeeded: its items no longer count against the bounds."""
        self._queued -= Counter(item[0] for item in items if isinstance(item, tuple) and item[0] in self.bounds)
        if items:
            self._warned = False  # the journal writes again: a later failure's drops are logged anew

    def put_back(self, items: list[Item]) -> None:
        """A write failed: its items go back in front of what was queued meanwhile, none lost.

        They were counted against the bounds all along (see `take`), so they are not counted again.
        A gap opened while they were in flight is merged into theirs: the same failure goes on, and
        one gap per failed write would grow the queue for as long as the failure lasts."""
        self._items[:0] = items
        taken_gap = next((item[2] for item in items if is_gap(item)), None)
        if taken_gap is None:
            return
        if self._gap is not None:
            _merge(taken_gap, self._gap)
            new_gap = self._gap
            self._items = [item for item in self._items
                           if not (is_gap(item) and item[2] is new_gap)]
        self._gap = taken_gap  # nothing writes it now: it counts on

    def _count_dropped(self, kind: RecordKind, at: float, payload: dict[str, Any]) -> None:
        first, last = (payload["from"], payload["to"]) if kind is RecordKind.CORE_STEPS else (at, at)
        gap = self._gap
        if gap is None and not self._warned:
            self._warned = True
            log.warning("the journal still fails: %s past their bound are no longer queued; every decision and "
                        "input still is. A JournalGap record will say what is missing",
                        " and ".join(f"{_WHAT[k]} ({n})" for k, n in self.bounds.items()))
        if gap is None:
            gap = self._gap = {"from": first, "to": last, "step_batches": 0, "steps": 0, "samples": 0}
            self._items.append((RecordKind.JOURNAL_GAP, at, gap))
        gap["from"], gap["to"] = min(gap["from"], first), max(gap["to"], last)
        if kind is RecordKind.CORE_STEPS:
            gap["step_batches"] += 1
            gap["steps"] += payload["count"]
        else:
            gap["samples"] += 1


def is_gap(item: Item) -> bool:
    """Whether a queued item is a `JournalGap` note."""
    return isinstance(item, tuple) and item[0] is RecordKind.JOURNAL_GAP


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Count `other`'s dropped items in `into`: the span covering both, the counts summed."""
    into["from"], into["to"] = min(into["from"], other["from"]), max(into["to"], other["to"])
    for key in ("step_batches", "steps", "samples"):
        into[key] += other[key]


_WHAT = {RecordKind.CORE_STEPS: "batches of core steps (for replay)",
         RecordKind.SAMPLE: "history samples (for the owner's chart)"}
