"""Per-event accounting read back from a journal: what was asked, answered and delivered.

This is what the aggregator pays on, so it is derived only from records (never
from live state): the request (its latest revision), the answer, when the event
ended, the last energy record (the inverter meter delta, cross-checked with
integrated power) and what happened to the gateway while the event ran.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from firmware_py.core.types import DispatchAnswer, ReasonCode, Verdict
from firmware_py.core.types import describe as describe_answer
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.store import Record

EVENT_KINDS = frozenset({RecordKind.DISPATCH_REQUEST, RecordKind.DISPATCH_ANSWER, RecordKind.DISPATCH_CANCEL,
                         RecordKind.DISPATCH_ENDED, RecordKind.EVENT_ENERGY})
WINDOW_KINDS = frozenset({RecordKind.TRANSITION, RecordKind.FAULT_RAISED, RecordKind.FAULT_CLEARED,
                          RecordKind.OWNER_SETTINGS, RecordKind.INSTALLER_RESET})
SERVED = frozenset({Verdict.ACCEPTED, Verdict.CAPPED})


@dataclass(frozen=True)
class TimelineEntry:
    at: float
    seq: int
    kind: RecordKind | str
    text: str


@dataclass
class EventSummary:
    """One dispatch event as the journal tells it. None = the journal holds no such record.

    `discrepancy_pct` = (meter - integrated) / meter x 100: how far the billed
    meter and the power integral disagree; None when the meter shows 0 Wh but
    power was integrated (a stalled meter: no percentage describes that).
    """

    request_id: str
    source: str | None = None
    kind: str | None = None
    target_w: float | None = None
    revision: int | None = None
    received_at: float | None = None
    start: float | None = None
    end: float | None = None
    verdict: str | None = None
    cap_w: float | None = None
    reason: str | None = None
    detail: str = ""
    ended_at: float | None = None
    ended_reason: str | None = None
    meter_wh: float = 0.0
    integrated_wh: float = 0.0
    final: bool = False
    discrepancy_pct: float | None = 0.0
    timeline: list[TimelineEntry] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        """Accepted (with or without a cap): only then did the gateway act on it."""
        return self.verdict in SERVED


class RecordSource(Protocol):
    """Where summaries read records from: one segment (`Journal`) or the whole journal (`Chain`)."""

    def iter_records(self, kinds: Collection[RecordKind | str] | None = None) -> Iterator[Record]: ...

    def newest_at(self) -> float | None: ...


def event_summaries(source: RecordSource, only: str | None = None) -> list[EventSummary]:
    """One summary per request id (or only `only`), in the order the events first appear in the journal.

    Two streaming passes: the events' own records, then the records that fall in
    the windows of the events that ran. Memory grows with the events and their
    timelines, never with the journal's length.
    """
    events: dict[str, EventSummary] = {}
    last_at = source.newest_at() or 0.0
    for record in source.iter_records(EVENT_KINDS | {RecordKind.SEGMENT_START}):
        for own in _carried(record, events) if record.kind == RecordKind.SEGMENT_START else (record,):
            request_id = str(own.payload.get("request_id", own.payload.get("id")))
            if only is not None and request_id != only:
                continue
            summary = events.setdefault(request_id, EventSummary(request_id))
            _apply(summary, own)
            summary.timeline.append(_entry(own))
            last_at = max(last_at, own.at)
    windows = []
    for summary in events.values():
        summary.discrepancy_pct = _discrepancy(summary.meter_wh, summary.integrated_wh)
        if summary.ran:
            windows.append((*_window(summary, last_at), summary))
    if windows:
        for record in source.iter_records(WINDOW_KINDS):
            for lo, hi, summary in windows:
                if lo <= record.at <= hi:
                    summary.timeline.append(_entry(record))
    for summary in events.values():
        summary.timeline.sort(key=lambda e: (e.at, e.seq))
    return list(events.values())


def _carried(start: Record, known: dict[str, EventSummary]) -> list[Record]:
    """The records a rotation carried for events still open, for events whose own records were
    pruned with an older segment (an event already read from its own records is not read twice)."""
    carried = []
    for item in start.payload.get("carry") or []:
        payload = item.get("payload") if isinstance(item, dict) else None
        if not isinstance(payload, dict) or str(payload.get("request_id", payload.get("id"))) in known:
            continue
        at = _num(payload.get("at", payload.get("received_at")))
        carried.append(Record(start.seq, start.at if at is None else at, start.wall, RecordKind.read(str(item["kind"])),
                              payload, start.prev_hash, start.hash))
    return carried


def _apply(summary: EventSummary, record: Record) -> None:
    """Fold one of the event's own records into its summary (later records win)."""
    p = record.payload
    if record.kind == RecordKind.DISPATCH_REQUEST:
        summary.source, summary.kind, summary.revision = p.get("source"), p.get("kind"), p.get("revision")
        summary.target_w, summary.received_at = _num(p.get("target_w")), _num(p.get("received_at"))
        summary.start, summary.end = _num(p.get("start")), _num(p.get("end"))
    elif record.kind == RecordKind.DISPATCH_ANSWER:
        # A DUPLICATE answer restates a request already answered: keep the real answer.
        if p.get("reason") != ReasonCode.DUPLICATE or summary.verdict is None:
            summary.verdict, summary.cap_w = p.get("verdict"), _num(p.get("cap_w"))
            summary.reason, summary.detail = p.get("reason"), p.get("detail", "")
    elif record.kind == RecordKind.DISPATCH_ENDED:
        summary.ended_at, summary.ended_reason = record.at, p.get("reason")
    elif record.kind == RecordKind.EVENT_ENERGY:
        summary.meter_wh = _num(p.get("meter_wh")) or 0.0
        summary.integrated_wh = _num(p.get("integrated_wh")) or 0.0
        summary.final = bool(p.get("final", False))


def _window(summary: EventSummary, last_at: float) -> tuple[float, float]:
    """From the event's start (or first record) to its end (or the journal's last record)."""
    own = [e.at for e in summary.timeline]
    lo = summary.start if summary.start is not None else min(own)
    if summary.ended_at is not None:
        hi = summary.ended_at
    elif summary.end is not None:
        hi = min(summary.end, last_at)
    else:
        hi = last_at
    return lo, hi


def _discrepancy(meter_wh: float, integrated_wh: float) -> float | None:
    if meter_wh == 0:
        return 0.0 if integrated_wh == 0 else None
    return (meter_wh - integrated_wh) / meter_wh * 100.0


def _num(value: Any) -> float | None:
    """Journal payloads store inf as "inf"; float() reads that back. Unreadable -> None."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _entry(record: Record) -> TimelineEntry:
    return TimelineEntry(record.at, record.seq, record.kind, describe(record))


def describe(record: Record) -> str:
    """One line a person can read for a record in a timeline."""
    p = record.payload
    match record.kind:
        case RecordKind.DISPATCH_REQUEST:
            return f"request {p.get('kind')} {_w(p.get('target_w'))} from {p.get('source')} (rev {p.get('revision')})"
        case RecordKind.DISPATCH_ANSWER:
            return _answer_text(record)
        case RecordKind.DISPATCH_CANCEL:
            return f"cancelled by {p.get('source')}"
        case RecordKind.DISPATCH_ENDED:
            return f"ended: {p.get('reason')}"
        case RecordKind.EVENT_ENERGY:
            label = "final energy" if p.get("final") else "energy"
            return f"{label}: meter {float(p.get('meter_wh', 0)):.1f} Wh, integrated {float(p.get('integrated_wh', 0)):.1f} Wh"
        case RecordKind.TRANSITION:
            return f"{p.get('from_state')} -> {p.get('to_state')}: {p.get('reason')}"
        case RecordKind.FAULT_RAISED:
            return f"fault raised: {p.get('kind')}" + (f" ({p['detail']})" if p.get("detail") else "")
        case RecordKind.FAULT_CLEARED:
            return f"fault cleared: {p.get('kind')}"
        case RecordKind.OWNER_SETTINGS:
            return f"owner settings: reserve {p.get('reserve_pct')} %, opt-out until {p.get('opt_out_until')}"
        case RecordKind.INSTALLER_RESET:
            return "installer reset"
    return f"{record.kind} {p}"


def _answer_text(record: Record) -> str:
    """An answer record in the words every other reader uses; a damaged one as it was stored."""
    try:
        answer = record.event()
    except ValueError:
        answer = None
    if isinstance(answer, DispatchAnswer):
        return describe_answer(answer)
    p = record.payload
    return " ".join(str(p[k]) for k in ("verdict", "cap_w", "reason", "detail") if p.get(k) not in (None, ""))


def _w(value: Any) -> str:
    return "?" if value is None else f"{float(value):.0f} W"
