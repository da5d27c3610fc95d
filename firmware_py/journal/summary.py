"""Per-event accounting read back from a journal: what was asked, answered and delivered.

This is what the aggregator pays on, so it is derived only from records (never
from live state): the request (its latest revision), the answer, when the event
ended, the last energy record (the inverter meter delta, cross-checked with
integrated power) and what happened to the gateway while the event ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from firmware_py.journal.store import Journal, Record

EVENT_KINDS = ("DispatchRequest", "DispatchAnswer", "DispatchCancel", "DispatchEnded", "EventEnergy")
WINDOW_KINDS = ("Transition", "FaultRaised", "FaultCleared", "OwnerSettings", "InstallerReset")


@dataclass(frozen=True)
class TimelineEntry:
    at: float
    seq: int
    kind: str
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
        return self.verdict in ("accepted", "accepted_capped")


def event_summaries(journal: Journal) -> list[EventSummary]:
    """One summary per request id, in the order the events first appear in the journal."""
    records = journal.records()
    events: dict[str, EventSummary] = {}
    for record in records:
        if record.kind in EVENT_KINDS:
            request_id = str(record.payload.get("request_id", record.payload.get("id")))
            summary = events.setdefault(request_id, EventSummary(request_id))
            _apply(summary, record)
            summary.timeline.append(_entry(record))
    window_records = [r for r in records if r.kind in WINDOW_KINDS]
    last_at = max((r.at for r in records), default=0.0)
    for summary in events.values():
        summary.discrepancy_pct = _discrepancy(summary.meter_wh, summary.integrated_wh)
        if summary.ran:
            lo, hi = _window(summary, last_at)
            summary.timeline += [_entry(r) for r in window_records if lo <= r.at <= hi]
        summary.timeline.sort(key=lambda e: (e.at, e.seq))
    return list(events.values())


def _apply(summary: EventSummary, record: Record) -> None:
    """Fold one of the event's own records into its summary (later records win)."""
    p = record.payload
    if record.kind == "DispatchRequest":
        summary.source, summary.kind, summary.revision = p.get("source"), p.get("kind"), p.get("revision")
        summary.target_w, summary.received_at = _num(p.get("target_w")), _num(p.get("received_at"))
        summary.start, summary.end = _num(p.get("start")), _num(p.get("end"))
    elif record.kind == "DispatchAnswer":
        # A DUPLICATE answer restates a request already answered: keep the real answer.
        if p.get("reason") != "DUPLICATE" or summary.verdict is None:
            summary.verdict, summary.cap_w = p.get("verdict"), _num(p.get("cap_w"))
            summary.reason, summary.detail = p.get("reason"), p.get("detail", "")
    elif record.kind == "DispatchEnded":
        summary.ended_at, summary.ended_reason = record.at, p.get("reason")
    elif record.kind == "EventEnergy":
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
        case "DispatchRequest":
            return f"request {p.get('kind')} {_w(p.get('target_w'))} from {p.get('source')} (rev {p.get('revision')})"
        case "DispatchAnswer":
            text = str(p.get("verdict"))
            if p.get("cap_w") is not None:
                text += f" cap {_w(p['cap_w'])}"
            if p.get("reason"):
                text += f" {p['reason']}"
            return text + (f": {p['detail']}" if p.get("detail") else "")
        case "DispatchCancel":
            return f"cancelled by {p.get('source')}"
        case "DispatchEnded":
            return f"ended: {p.get('reason')}"
        case "EventEnergy":
            label = "final energy" if p.get("final") else "energy"
            return f"{label}: meter {float(p.get('meter_wh', 0)):.1f} Wh, integrated {float(p.get('integrated_wh', 0)):.1f} Wh"
        case "Transition":
            return f"{p.get('from_state')} -> {p.get('to_state')}: {p.get('reason')}"
        case "FaultRaised":
            return f"fault raised: {p.get('kind')}" + (f" ({p['detail']})" if p.get("detail") else "")
        case "FaultCleared":
            return f"fault cleared: {p.get('kind')}"
        case "OwnerSettings":
            return f"owner settings: reserve {p.get('reserve_pct')} %, opt-out until {p.get('opt_out_until')}"
        case "InstallerReset":
            return "installer reset"
    return f"{record.kind} {p}"


def _w(value: Any) -> str:
    return "?" if value is None else f"{float(value):.0f} W"
