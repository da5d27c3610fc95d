"""The web app's History view: the last day of SoC, floor, setpoint and power, and its events, from the journal.

Everything shown comes from journal records, never from memory kept beside
them, so the chart survives a restart and shows what an auditor would find:
- the curves from the `Sample` records the gateway journals every
  `[journal] sample_interval_s` (what the core's read model said then);
- the events from their own records (request, answer, end, energy), folded the
  way `report` folds them (`journal.summary`), each with its line of this month's
  statement (`figures`: credit, wear, net, SoC, throughput...), which the
  statement's own code computed (`statements.earnings`; null until it has).

The journal is opened read-only on its own connection (SQLite in WAL mode lets
it read beside the gateway's writer), in a worker thread, and read newest first
through its kind index, so a day's history costs a day's records whatever the
journal's length. At most `MAX_POINTS` points go to the page, and the samples are
thinned as they are read (`_thinned`): a request holds about the points it sends.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.store import Journal, Record
from firmware_py.journal.summary import EVENT_KINDS, WINDOW_KINDS, event_summaries

log = logging.getLogger(__name__)

ANNOUNCED = frozenset({RecordKind.DISPATCH_REQUEST, RecordKind.PRICE_INTERVAL, RecordKind.DISPATCH_ANSWER})
"""The records that say what an event was and how it was answered."""
ANNOUNCED_S = 7 * 24 * 3600.0
"""How far before the window the announcement of an event that ran in it is looked for: day-ahead events
(OpenADR) are announced the evening before; a week bounds the read, whatever the journal's length."""

HISTORY_S = 24 * 3600.0
MAX_POINTS = 1_500
"""About one a minute over a day: a phone's chart has no use for more."""
HOLE_INTERVALS = 3
"""Samples further apart than this many sample intervals are not joined on the chart: the gateway was
stopped, or its journal failed so long that samples were not kept (`journal.backlog`). A line drawn
across would show values nobody measured."""


class _Window:
    """The records of one window, read once, offered as `event_summaries` reads a journal."""

    def __init__(self, records: list[Record]) -> None:
        self._records = records

    def records(self, kind: RecordKind | str | None = None, since_seq: int = 0) -> list[Record]:
        return [r for r in self._records if r.seq > since_seq and (kind is None or r.kind == kind)]

    def iter_records(self, kinds: Collection[RecordKind | str] | None = None, since_seq: int = 0) -> Iterator[Record]:
        return iter([r for r in self._records if r.seq > since_seq and (kinds is None or r.kind in kinds)])


def read_history(journal_path: str | Path, now_wall: float, interval_s: float,
                 span_s: float = HISTORY_S) -> dict[str, Any]:
    """`{"from", "to", "samples": [[wall, soc, floor, setpoint, power], ...], "events": [...]}` (wall = UTC s).

    Where samples `interval_s` apart are missing, a row of nulls marks the hole (`HOLE_INTERVALS`)."""
    since = now_wall - span_s
    with Journal.open(journal_path, readonly=True) as journal:
        points = _points(journal.newest_first([RecordKind.SAMPLE], since, damaged=_skip_damaged), interval_s)
        window = journal.recent(EVENT_KINDS | WINDOW_KINDS, since, damaged=_skip_damaged)
        window = _announced_before(journal, window, since) + window
    return {"from": since, "to": now_wall, "samples": points, "events": _events(window)}


def _announced_before(journal: Journal, window: list[Record], since: float) -> list[Record]:
    """The requests and answers, from before the window, of the events with records in it but no answer:
    an event announced and answered the day before and delivering in the window was left out of History.
    Oldest first, to stand before the window's records as they stood in the journal."""
    answered = {_request_id(r) for r in window if r.kind == RecordKind.DISPATCH_ANSWER}
    unanswered = {_request_id(r) for r in window if r.kind in EVENT_KINDS} - answered
    if not unanswered:
        return []
    found = [r for r in journal.newest_first(ANNOUNCED, since - ANNOUNCED_S, damaged=_skip_damaged)
             if r.wall < since and _request_id(r) in unanswered]
    return found[::-1]


def _request_id(record: Record) -> str:
    """The event an event record belongs to, keyed as `event_summaries` keys it."""
    return str(record.payload.get("request_id", record.payload.get("id")))


def _skip_damaged(seq: int) -> None:
    """A record whose payload cannot be read (a torn row, a bad sector) is left out of the chart: one such row
    made every History request a 500 until it left the window a day later. Logged by seq only (the payload may
    be anything); `report` and `check` flag it."""
    log.warning("history: journal record %d skipped: its payload cannot be read (`powershare-gw report` flags it)", seq)


def _points(newest_first: Iterable[Record], interval_s: float) -> list[list[Any]]:
    """The chart's rows, oldest first, evenly thinned to at most `MAX_POINTS`, with a null row at each hole."""
    rows, stride = _thinned(newest_first)
    hole_s = HOLE_INTERVALS * interval_s * stride
    points: list[list[Any]] = []
    for row in reversed(rows):
        if points and row[0] - points[-1][0] > hole_s:
            points.append([round((points[-1][0] + row[0]) / 2, 1), None, None, None, None])
        points.append(row)
    return points


def _thinned(newest_first: Iterable[Record]) -> tuple[list[list[Any]], int]:
    """Every `stride`-th sample's row from the newest, and the stride, kept as they are read: the stride doubles
    whenever 2 * `MAX_POINTS` rows are held, so a day at a sample a second (86,400) never sits in memory whole
    (it took about 100 MB a request)."""
    rows: list[list[Any]] = []
    stride = 1
    for n, record in enumerate(newest_first):
        if n % stride == 0:
            rows.append(_row(record))
            if len(rows) == 2 * MAX_POINTS:
                rows, stride = rows[::2], stride * 2
    more = max(1, -(-len(rows) // MAX_POINTS))
    return rows[::more], stride * more


def _row(sample: Record) -> list[Any]:
    """`[wall, soc, floor, setpoint, power]`, as the page draws it."""
    p = sample.payload
    return [round(sample.wall, 1), p.get("soc_pct"), p.get("floor_pct"), p.get("setpoint_w"), p.get("power_w")]


def _events(records: list[Record]) -> list[dict[str, Any]]:
    """The events seen in the window, newest first, as the page lists them."""
    shown = []
    for e in event_summaries(_Window(records)):  # type: ignore[arg-type]  # reads a journal's records
        if e.verdict is None:
            continue  # no answer in the window nor in the week before it (`_announced_before`)
        shown.append({"id": e.request_id, "source": e.source, "kind": e.kind, "target_w": e.target_w,
                      "answer": e.verdict, "cap_w": e.cap_w, "reason": e.reason, "detail": e.detail,
                      "start": e.start, "end": e.ended_at if e.ended_at is not None else e.end,
                      "ended": e.ended_reason, "delivered_wh": round(e.meter_wh, 1), "final": e.final})
    return shown[::-1]


def with_figures(doc: dict[str, Any], currency: str, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`doc` with the statement's currency and each event's statement line (`figures`, null when not computed)."""
    events = [{**e, "figures": figures.get(e["id"])} for e in doc["events"]]
    return {**doc, "currency": currency, "events": events}
