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
        self._gap: dict[str, Any] | None = None
        """The payload of the gap the dropped items of this queue are counted in (None: nothing dropped)."""

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

        The gap taken with it is closed: what is dropped from now on is counted in a new one, so a
        payload in the writer's hands is never changed under it."""
        items, self._items = self._items, []
        self._queued.clear()
        self._gap = None
        return items

    def put_back(self, items: list[Item]) -> None:
        """A write failed: its items go back in front of what was queued meanwhile, none lost."""
        self._items[:0] = items
        for item in items:
            if isinstance(item, tuple) and item[0] in self.bounds:
                self._queued[item[0]] += 1
            elif isinstance(item, tuple) and item[0] is RecordKind.JOURNAL_GAP and self._gap is None:
                self._gap = item[2]  # the same failure goes on: its gap counts on (nothing was dropped since)

    def _count_dropped(self, kind: RecordKind, at: float, payload: dict[str, Any]) -> None:
        first, last = (payload["from"], payload["to"]) if kind is RecordKind.CORE_STEPS else (at, at)
        gap = self._gap
        if gap is None:
            log.warning("the journal still fails: %s past their bound are no longer queued; every decision and "
                        "input still is. A JournalGap record will say what is missing",
                        " and ".join(f"{_WHAT[k]} ({n})" for k, n in self.bounds.items()))
            gap = self._gap = {"from": first, "to": last, "step_batches": 0, "steps": 0, "samples": 0}
            self._items.append((RecordKind.JOURNAL_GAP, at, gap))
        gap["from"], gap["to"] = min(gap["from"], first), max(gap["to"], last)
        if kind is RecordKind.CORE_STEPS:
            gap["step_batches"] += 1
            gap["steps"] += payload["count"]
        else:
            gap["samples"] += 1


_WHAT = {RecordKind.CORE_STEPS: "batches of core steps (for replay)",
         RecordKind.SAMPLE: "history samples (for the owner's chart)"}
