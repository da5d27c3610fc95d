"""Per-event accounting read back from a journal: what was asked, answered and delivered.

This is what the aggregator pays on, so it is derived only from records (never
from live state): the request (its latest revision), the answer, when the event
ended, the last energy record (the inverter meter delta, cross-checked with
integrated power) and what happened to the gateway while the event ran.

Two clocks (`firmware_py/clocks.py`): which records fall in an event's window is
judged on the core's time base (`Record.at`, which no wall-clock step moves)
within its run: that clock starts again near 0 at every boot, so a record's place
in time is its run (counted by `CoreStart` records), then its `at`. Every time
shown is wall time (`Record.wall`, and an instant named in a record converted
with that record's own offset), UTC epoch seconds for a gateway's journal,
simulated seconds for a bench's.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from firmware_py.core.energy import ASIDE
from firmware_py.core.types import DispatchAnswer, DispatchKind, Verdict
from firmware_py.core.types import describe as describe_answer
from firmware_py.journal.codec import number
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.owner_log import describe as describe_owner_change
from firmware_py.journal.store import Record

EVENT_KINDS = frozenset({RecordKind.DISPATCH_REQUEST, RecordKind.PRICE_INTERVAL, RecordKind.DISPATCH_ANSWER,
                         RecordKind.DISPATCH_CANCEL, RecordKind.DISPATCH_ENDED, RecordKind.EVENT_ENERGY})
WINDOW_KINDS = frozenset({RecordKind.TRANSITION, RecordKind.FAULT_RAISED, RecordKind.FAULT_CLEARED,
                          RecordKind.OWNER_SETTINGS, RecordKind.INSTALLER_RESET, RecordKind.STALL,
                          RecordKind.RESYNCED, RecordKind.LINK_LOST, RecordKind.LINK_RECOVERED})
SERVED = frozenset({Verdict.ACCEPTED, Verdict.CAPPED})

Position: TypeAlias = tuple[int, float]
"""A record's place in time: (its run, counted by `CoreStart` records, its core time `at`). The core's
clock starts again near 0 at every boot, so `at` alone cannot order records of different runs."""


@dataclass(frozen=True)
class TimelineEntry:
    """One record of an event's timeline. An `EventEnergy` record's entry also keeps its meter reading (its
    account's own figure, as recorded) and whether it was final: a statement bills an event's energy records
    from the entries its summary was built from, since a record a rotation carried has no seq of its own
    (it stands at its segment start's) and cannot be looked up again by seq."""

    at: float  # wall time
    seq: int
    kind: RecordKind | str
    text: str
    meter_wh: float | None = None  # an `EventEnergy` record's meter reading; None for any other record
    final: bool = False  # an `EventEnergy` record that closed its account


@dataclass
class EventSummary:
    """One dispatch event as the journal tells it. None = the journal holds no such record.

    Times (`received_at`, `start`, `end`, `ended_at`) are wall time, as people read them.

    A price-driven event (price-responsive mode) comes from a `PriceInterval` record
    instead of a request: `price_per_kwh` and `price_kind` are the published price it
    discharged for (the latest revision the gateway accepted; a refused one shows the
    price first published), None for every other event.

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
    price_per_kwh: float | None = None
    price_kind: str | None = None
    span: tuple[Position, Position] | None = None  # its window on the core's clock (`_bounds`): what ran in it
    offset: float | None = None  # wall - core of the record that set its start: its window's one way to wall time

    @property
    def ran(self) -> bool:
        """Accepted (with or without a cap): only then did the gateway act on it."""
        return self.verdict in SERVED

    @property
    def closed_at(self) -> float | None:
        """Where its window ends in wall time: its `DispatchEnded`, else its stated end; never before its start.

        A restart closes every event a dead run left open, one whose window had not begun yet too: that
        record's time is before the start, and the window was empty. It is shown ending where it would have
        begun (as the statement's window is), not as a window that ran backwards; its timeline says when."""
        end = self.ended_at if self.ended_at is not None else self.end
        if end is None or self.start is None:
            return end
        return max(self.start, end)


@dataclass
class _Window:
    """An event's bounds on the core's time base: which other records happened while it ran."""

    first: Position  # its first record
    start: float | None = None
    start_run: int = 0  # the run whose request or price record stated `start` and `end`
    end: float | None = None
    ended: Position | None = None  # its `DispatchEnded`, which a later run writes for an event a restart cut
    offered: tuple[float | None, str | None] | None = None  # a price event: the price its last record published
    closed_wh: tuple[float, float] = (0.0, 0.0)  # meter and integral of its accounts closed in earlier runs
    opened_in: int = 0  # the run (counted by `CoreStart` records) whose answer opened its account
    offset: float | None = None  # wall - core of the record that set `start` (or of its first record)


class RecordSource(Protocol):
    """Where summaries read records from: one segment (`Journal`) or the whole journal (`Chain`)."""

    def iter_records(self, kinds: Collection[RecordKind | str] | None = None) -> Iterator[Record]: ...


def event_summaries(source: RecordSource, only: str | None = None) -> list[EventSummary]:
    """One summary per request id (or only `only`), in the order the events first appear in the journal.

    Two streaming passes: the events' own records, then the records that fall in
    the windows of the events that ran, both placing each record by its run
    (`_positioned`). Memory grows with the events and their timelines, never with
    the journal's length. A revision that turned a served event into the other kind
    (a discharge into a charge) ended it and began a new account: the id then has a
    second summary, so each kind's energy is billed as what it was.

    A request or price record is held until the next record of its id, its answer, says whether it
    counts (`_Held`): one the core set aside (`ASIDE`: a DUPLICATE, a price of the kind not followed)
    changed nothing, so it is on the event's timeline but states none of its fields. It once
    rewrote the event's target, window, source and offered price on arrival: a turned-away
    duplicate billed the event as the duplicate asked.
    """
    events: dict[str, EventSummary] = {}
    windows: dict[str, _Window] = {}
    keys: dict[str, str] = {}  # request id -> the key of its summary now (a second one after a change of kind)
    held: dict[str, _Held] = {}  # a request or price record not yet applied: its answer says whether it counts
    # A restarted gateway's core starts with no account: an event it answers again starts from 0 Wh.
    for run, record in _positioned(source, EVENT_KINDS | {RecordKind.SEGMENT_START}):
        for own in _carried(record, events) if record.kind == RecordKind.SEGMENT_START else (record,):
            request_id = str(own.payload.get("request_id", own.payload.get("id")))
            if only is not None and request_id != only:
                continue
            key = keys.setdefault(request_id, request_id)
            waiting = held.get(request_id)
            if waiting is not None and (not waiting.turning or own.kind == RecordKind.DISPATCH_ANSWER):
                del held[request_id]
                if waiting.turning:
                    if own.payload.get("verdict") in SERVED:  # a new account, of the other kind
                        key = keys[request_id] = f"{request_id}\x1f{len(events)}"
                        events[key], windows[key] = EventSummary(request_id), _Window(
                            first=(waiting.run, waiting.record.at), offset=waiting.record.offset)
                        _apply(events[key], windows[key], waiting.record, waiting.run)
                        events[key].timeline.append(_entry(waiting.record))
                elif not _set_aside(events[key], own):
                    _apply(events[key], windows[key], waiting.record, waiting.run)
            if own.kind in (RecordKind.DISPATCH_REQUEST, RecordKind.PRICE_INTERVAL):
                turning = own.kind == RecordKind.DISPATCH_REQUEST and \
                    _changes_kind(events.get(key), own.payload.get("kind"))
                held[request_id] = _Held(own, run, turning)
                # its place on the timeline is where it came, whatever its answer
                if not turning:
                    events.setdefault(key, EventSummary(request_id))
                    windows.setdefault(key, _Window(first=(run, own.at), offset=own.offset))
                events[key].timeline.append(_entry(own))
                continue
            summary = events.setdefault(key, EventSummary(request_id))
            window = windows.setdefault(key, _Window(first=(run, own.at), offset=own.offset))
            _apply(summary, window, own, run)
            summary.timeline.append(_entry(own))
    for request_id, waiting in held.items():  # no answer came (a journal cut short): read it as it stands
        if not waiting.turning:
            key = keys[request_id]
            _apply(events[key], windows[key], waiting.record, waiting.run)
    ran = []
    for key, summary in events.items():
        summary.discrepancy_pct = _discrepancy(summary.meter_wh, summary.integrated_wh)
        summary.span, summary.offset = _bounds(windows[key]), windows[key].offset
        if summary.ran:
            ran.append((*summary.span, summary))
    if ran:
        for run, record in _positioned(source, WINDOW_KINDS):
            for lo, hi, summary in ran:
                if lo <= (run, record.at) <= hi:
                    summary.timeline.append(_entry(record))
    for summary in events.values():
        summary.timeline.sort(key=lambda e: e.seq)  # the journal's order is the order things happened
    return list(events.values())


@dataclass(frozen=True)
class _Held:
    """A request or price record waiting for the record that decides whether it counts.

    Most wait only for the next record of their id and are applied before it, so they count just where they
    stood: the gateway journals a request and what the core said to it in one transaction, and the next record
    is its answer, or the end and final energy of the event a refused revision ends (which never sets it aside).
    A revision turning a served event into the other kind (`turning`) waits for its answer itself: the old
    event's end and final energy come before it, and a served answer begins a new account. One whose answer
    never came (a journal cut short) is read as it stands, as it always was."""

    record: Record
    run: int
    turning: bool


def _set_aside(summary: EventSummary, answer: Record) -> bool:
    """Whether `answer` says the record before it changed nothing: a refusal in `ASIDE` of an event the
    journal already answered (when this is the first answer read for the id, its earlier records pruned, the
    record is all the journal says of the event, and is kept, as the answer branch of `_apply` keeps it).
    Any other refusal of a real revision still states what was asked (its DispatchEnded says why)."""
    return (answer.kind == RecordKind.DISPATCH_ANSWER and answer.payload.get("reason") in ASIDE
            and summary.verdict is not None)


def _positioned(source: RecordSource, kinds: Collection[RecordKind | str]) -> Iterator[tuple[int, Record]]:
    """The records of `kinds` with the run each belongs to (counted by `CoreStart` records, in journal order).

    Both passes count over the same source, so an event's bounds and the records they take in are
    numbered alike, even when older segments (and the runs they began) were pruned."""
    run = 0
    for record in source.iter_records({*kinds, RecordKind.CORE_START}):
        if record.kind == RecordKind.CORE_START:
            run += 1
        else:
            yield run, record


def _changes_kind(summary: EventSummary | None, kind: Any) -> bool:
    """A revision to `kind` of an event served as the other kind (a STOP only ends it: it changes nothing)."""
    stop = DispatchKind.STOP.value
    return summary is not None and summary.ran and summary.kind not in (None, stop, kind) and kind != stop


def _carried(start: Record, known: dict[str, EventSummary]) -> list[Record]:
    """The records a rotation carried for events still open, for events whose own records were
    pruned with an older segment (an event already read from its own records is not read twice).
    They stand at the segment start's place in the journal, with its offset to the wall clock."""
    carried = []
    for item in start.payload.get("carry") or []:
        payload = item.get("payload") if isinstance(item, dict) else None
        if not isinstance(payload, dict) or str(payload.get("request_id", payload.get("id"))) in known:
            continue
        at = number(payload.get("at", payload.get("received_at")))
        at = start.at if at is None else at
        carried.append(Record(start.seq, at, start.on_wall(at), RecordKind.read(str(item.get("kind"))), payload,
                              start.prev_hash, start.hash))
    return carried


def _apply(summary: EventSummary, window: _Window, record: Record, run: int) -> None:
    """Fold one of the event's own records into its summary (later records win).

    An event answered again in a later run (an aggregator delivering it again after a restart closed it)
    has a second account, counted from 0 Wh: the two are added. Within one run an account closed and
    opened again (a price weighed again) carries its energy on, and its records already include it."""
    p = record.payload
    if record.kind == RecordKind.DISPATCH_REQUEST:
        if p.get("kind") == DispatchKind.STOP.value and summary.kind not in (None, DispatchKind.STOP.value):
            summary.revision = p.get("revision")  # a revision to STOP ends the event: it stays what it served
            return
        summary.source, summary.kind, summary.revision = p.get("source"), p.get("kind"), p.get("revision")
        summary.target_w = number(p.get("target_w"))
        _set_window(summary, window, record, run)
    elif record.kind == RecordKind.PRICE_INTERVAL:
        summary.source, summary.revision = p.get("source"), p.get("revision")
        summary.kind = DispatchKind.DISCHARGE.value  # a price is only ever discharged for
        window.offered = (number(p.get("price_per_kwh")), p.get("kind"))
        if summary.price_per_kwh is None:
            summary.price_per_kwh, summary.price_kind = window.offered
        _set_window(summary, window, record, run)
    elif record.kind == RecordKind.DISPATCH_ANSWER:
        # A DUPLICATE answer restates a request already answered, and the price of the kind the owner does
        # not follow may share its interval's id with the one followed: keep the real answer.
        # A revision refused after the event was served ends it (its DispatchEnded says why), but the
        # energy already delivered was served: the event keeps its served answer, and is billed.
        refused_after_serving = summary.verdict in SERVED and p.get("verdict") not in SERVED
        if not refused_after_serving and (
                p.get("reason") not in ASIDE or summary.verdict is None):
            if window.offered is not None and p.get("verdict") in SERVED:  # the price it now discharges for
                summary.price_per_kwh, summary.price_kind = window.offered
            if p.get("verdict") in SERVED and (summary.final or summary.verdict not in SERVED):  # an account opens
                if summary.final and run > window.opened_in:
                    window.closed_wh = (summary.meter_wh, summary.integrated_wh)
                window.opened_in, window.ended = run, None  # the account before it ended, not this one
            summary.verdict, summary.cap_w = p.get("verdict"), number(p.get("cap_w"))
            summary.reason, summary.detail = p.get("reason"), p.get("detail", "")
    elif record.kind == RecordKind.DISPATCH_ENDED:
        window.ended = (run, record.at)
        summary.ended_at, summary.ended_reason = record.wall, p.get("reason")
    elif record.kind == RecordKind.EVENT_ENERGY:
        summary.meter_wh = window.closed_wh[0] + (number(p.get("meter_wh")) or 0.0)
        summary.integrated_wh = window.closed_wh[1] + (number(p.get("integrated_wh")) or 0.0)
        summary.final = bool(p.get("final", False))


def _set_window(summary: EventSummary, window: _Window, record: Record, run: int) -> None:
    """The bounds a request or price record states (later records win), but for the start of an account
    already being served: a revision arriving after its window began (an aggregator extending an event as a
    new interval from now) does not move the start later, or the time already served, with its energy, SoC
    drop and wear, would fall outside the event's window. Nor does one of an account closed and opened again,
    in the same run (an opt-out lifted, a standing setting asked again from now) or in a later one (sent again
    after a restart closed it): its energy carries on, as `_apply` reads it, and so must the time it was
    delivered in. A revision before the window began states the start afresh. A start before the request came
    (one a late poll brought) is when it came: its average power, SoC start and period count from then."""
    p = record.payload
    start, end, received = number(p.get("start")), number(p.get("end")), number(p.get("received_at"))
    if start is not None and received is not None and received > start:
        start = received  # it came after its window began: nothing of it could be served before it came
    wall_start = _on_wall(record, start)
    began = (summary.ran and window.start is not None
             and (window.start_run, window.start) <= (run, record.at))
    if began and (start is None or (run, start) > (window.start_run, window.start)):  # each run's own core clock
        start, wall_start = window.start, summary.start
    else:
        window.start_run, window.offset = run, record.offset
    window.start, window.end = start, end
    summary.received_at, summary.start, summary.end = (
        _on_wall(record, received), wall_start, _on_wall(record, end))


def _bounds(window: _Window) -> tuple[Position, Position]:
    """From the event's start (or first record) to its `DispatchEnded`, which may stand in a later run (the
    next boot closes an event a power cut left open). With none, to its stated end or, for an open-ended
    or never-ended one, to the last record of the run it started in: a later boot's core ran nothing of it."""
    lo = (window.start_run, window.start) if window.start is not None else window.first
    if window.ended is not None:
        return lo, window.ended
    return lo, (lo[0], window.end if window.end is not None else math.inf)


def _on_wall(record: Record, core_s: float | None) -> float | None:
    return None if core_s is None else record.on_wall(core_s)


def _discrepancy(meter_wh: float, integrated_wh: float) -> float | None:
    if meter_wh == 0:
        return 0.0 if integrated_wh == 0 else None
    return (meter_wh - integrated_wh) / meter_wh * 100.0




def _entry(record: Record) -> TimelineEntry:
    if record.kind == RecordKind.EVENT_ENERGY:
        return TimelineEntry(record.wall, record.seq, record.kind, describe(record),
                             meter_wh=number(record.payload.get("meter_wh")),
                             final=bool(record.payload.get("final", False)))
    return TimelineEntry(record.wall, record.seq, record.kind, describe(record))


def describe(record: Record) -> str:
    """One line a person can read for a record in a timeline."""
    p = record.payload
    match record.kind:
        case RecordKind.DISPATCH_REQUEST:
            return f"request {p.get('kind')} {_w(p.get('target_w'))} from {p.get('source')} (rev {p.get('revision')})"
        case RecordKind.PRICE_INTERVAL:
            return (f"price {p.get('kind')} {p.get('price_per_kwh')} per kWh from {p.get('source')}"
                    f" (program {p.get('program')}, rev {p.get('revision')})")
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
        case RecordKind.OWNER_SETTINGS | RecordKind.INSTALLER_RESET:
            return describe_owner_change(record)
        case RecordKind.STALL:
            return f"the gateway stalled {float(p.get('gap_s', 0)):.2f} s: resync, 0 W until fresh data"
        case RecordKind.RESYNCED:
            return "resynced: fresh data" if p.get("fresh") else "resync gave up: no fresh data within the grace"
        case RecordKind.LINK_LOST:
            return f"link lost: {p.get('link')}: {p.get('cause')}"
        case RecordKind.LINK_RECOVERED:
            return f"link recovered: {p.get('link')} after {float(p.get('after_s', 0)):.1f} s"
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
