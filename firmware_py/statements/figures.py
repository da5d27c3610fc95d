"""The figures of a bill-credit statement, from facts already read out of a journal (no I/O).

Why pure: a statement must be recomputable by anyone holding the journal
(`statement verify --journal`), so every figure is a function of the event
summaries (`journal.summary`, the same folding `report` uses), the samples the
core stepped on and the program's terms, and nothing else.

Definitions (docs/command-line.md, "statement"):
- delivered_wh: the inverter meter (TotWhInj delta) as the journal's final
  `EventEnergy` bills it; integrated_wh: the power integral beside it.
- outage_wh: meter energy that flowed while the gateway was in BACKUP (a grid
  outage: the truck carried the home), shown beside the event. It is never credited:
  the core bills an event no meter interval with the grid down, so delivered_wh
  holds none of it, except where a restart billed the meter's gap since the last
  report (which may span an outage): that gap loses the outage energy after that report. No meter
  change is read across a `JournalGap` (core steps not kept): when it happened, and whether the grid
  was up, nobody knows; the event's own energy records bill it, and a note names the gap.
- credited_wh = delivered_wh, less that share of a restart's gap, never below 0;
  only discharge events the gateway accepted earn credit.
- throughput_wh: energy out of the pack, the drop of the BMS's SoC (soc_min)
  from the event's start to its end times the usable capacity of its own run (net drop, not the
  sum of every wiggle: BMS SoC jitters by tenths), less the net change over time that was not the
  event's own: another event served (overlapping windows: the battery worked for one at a time, and
  each is charged only its own) and, where the run journaled what it served (`ServingChanged`), time
  that served no event (a grid outage's backup, a storm watch's charge); peak_w likewise counts only
  the event's own time (None where its window holds no reading: a killed run's unjournaled steps); equivalent_cycles =
  throughput_wh / usable capacity (one full cycle = one capacity's worth out).
- credit = credited kWh x credit_per_kwh, except for a price-driven event (price-responsive
  mode), one per published interval: credited kWh x the interval's published price;
  wear_cost = throughput kWh x
  wear_cost_per_kwh; net = credit - wear_cost (money rounded to cents per event;
  totals are sums of the rounded amounts, so a statement adds up on paper).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from firmware_py.core.types import DispatchKind, Verdict, is_finite_number
from firmware_py.errors import InputError
from firmware_py.journal.summary import SERVED, EventSummary, Position

MONEY_DIGITS = 2
CENT = Decimal(1).scaleb(-MONEY_DIGITS)
ENERGY_DIGITS = 3
DISCREPANCY_NOTE_PCT = 2.0
"""A meter and power integral further apart than this get a note (a meter the aggregator may query)."""
RESTART_REASON = "gateway restarted"
"""How `Gateway.close_open_events` begins the end reason of an event a dead run left open."""


class EventStatus(StrEnum):
    """Where an event stands in the journal: only ENDED and RESTARTED accounts are final."""

    ENDED = "ended"
    OPEN = "open"
    RESTARTED = "closed_after_restart"
    REFUSED = "refused"
    NOT_ANSWERED = "not_answered"


@dataclass(frozen=True)
class ProgramTerms:
    """The owner's enrolment (`[program]` in the configuration)."""

    name: str = ""
    currency: str = "USD"
    credit_per_kwh: float = 0.0
    wear_cost_per_kwh: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "currency": self.currency, "credit_per_kwh": self.credit_per_kwh,
                "wear_cost_per_kwh": self.wear_cost_per_kwh}


@dataclass(frozen=True)
class Period:
    """[start, end) in wall seconds (UTC epoch for a gateway, simulated seconds for a bench)."""

    start: float
    end: float

    def holds(self, at: float) -> bool:
        return self.start <= at < self.end


@dataclass(frozen=True)
class Sample:
    """What the core was told at one step, in wall time: `soc_pct` (BMS soc_min), `power_w` and
    `meter_wh` (TotWhInj) from the inverter, the floor in force, whether the gateway was in BACKUP, the
    usable capacity its run's core started with (a later run's may differ: a pack re-rated), which
    request the core served after the step, and whether its run journaled which request it served (a run of
    an older release did not: there `serving` None cannot tell "none served" from "not journaled")."""

    wall: float
    soc_pct: float | None
    power_w: float | None
    meter_wh: float | None
    floor_pct: float | None
    backup: bool
    capacity_wh: float | None = None
    serving: str | None = None  # the request the inverter worked for from this sample on (None: none, or not journaled)
    servings_journaled: bool = False  # its run journaled `ServingChanged` records: None above means none served
    position: Position | None = None  # (run, core time) of its step: which event windows it falls in


@dataclass
class Tally:
    """What the samples in one event's window add up to (a fold: memory does not grow with them)."""

    lo: float
    hi: float
    request_id: str | None = None  # whose tally: the samples while another request was served are not its own
    soc_start: float | None = None
    soc_end: float | None = None
    soc_min: float | None = None
    floor_pct: float | None = None
    peak_w: float | None = None
    outage_wh: float = 0.0
    gap_from: float | None = None  # the wall time of the event's last report before its final one
    gap_outage_wh: float = 0.0  # outage energy after it: what a restart's meter gap may hold
    capacity_wh: float | None = None  # the usable capacity in force at soc_start: what the SoC drop is of
    lent_pct: float = 0.0  # the net SoC change over time not the event's own (see `lent`): not its wear
    gaps: int = 0  # journal gaps (core steps not kept) in its window: no meter change is read across one
    span: tuple[Position, Position] | None = None  # the window on the core's clock, which no wall-clock step moves
    steps: int = 0
    """Core steps of its own in its window: none where the run that served it died before it journaled its
    batch of steps. A step of the next run before it closed the event (serving nothing yet) is not one."""

    @property
    def drop_pct(self) -> float:
        """The event's own net SoC drop: start to end, less the net change over time not its own (another
        request served, or, where the run journaled it, none: a grid outage's backup, a storm watch's charge)."""
        if self.soc_start is None or self.soc_end is None:
            return 0.0
        return max(0.0, self.soc_start - self.soc_end - self.lent_pct)

    def covers(self, sample: Sample) -> bool:
        """Whether the sample's step fell in the window: judged on the core's clock (its run, then core time)
        where both have it, as the event's own records are (`journal.summary`): a wall-clock step (NTP) in
        the window moves neither. `lo`/`hi` (wall time) only for a tally or sample without one."""
        if self.span is not None and sample.position is not None:
            return self.span[0] <= sample.position <= self.span[1]
        return self.lo <= sample.wall <= self.hi

    def overlaps(self, lo: float, hi: float, span: tuple[Position, Position] | None) -> bool:
        """Whether a stretch (a journal gap) touches the window, on the core's clock where both have it."""
        if self.span is not None and span is not None:
            return span[0] <= self.span[1] and self.span[0] <= span[1]
        return lo <= self.hi and self.lo <= hi

    def lent(self, sample: Sample, previous: Sample | None) -> bool:
        """Whether the time up to `sample` was not the event's own: the request the core served after the
        sample before (a step's decision holds until the next) was not this one. Where the run journaled
        which request it served, time served by none (a grid outage carrying the house, a storm watch
        charging the truck, standby) is not the event's either; in a journal of an older release, which
        did not journal it, time served by none stays the event's, so its statements keep their figures."""
        served = (previous or sample).serving
        if sample.servings_journaled:  # and a step that found the grid down: its reading is the house's load
            return served != self.request_id or sample.backup
        return served is not None and served != self.request_id

    def add(self, sample: Sample, previous: Sample | None) -> None:
        lent = self.lent(sample, previous)
        if not lent or sample.serving == self.request_id:
            self.steps += 1
        if sample.soc_pct is not None:
            if self.soc_start is None:
                self.soc_start, self.capacity_wh = sample.soc_pct, sample.capacity_wh
            elif lent and self.soc_end is not None:
                self.lent_pct += self.soc_end - sample.soc_pct
            self.soc_end = sample.soc_pct
            self.soc_min = _lowest(self.soc_min, sample.soc_pct)
        if sample.power_w is not None and not lent:
            self.peak_w = sample.power_w if self.peak_w is None else max(self.peak_w, sample.power_w)
        if sample.floor_pct is not None:
            self.floor_pct = sample.floor_pct if self.floor_pct is None else max(self.floor_pct, sample.floor_pct)
        outage = outage_step_wh(sample, previous)
        self.outage_wh += outage
        if self.gap_from is not None and sample.wall > self.gap_from:
            self.gap_outage_wh += outage


def outage_step_wh(sample: Sample, previous: Sample | None) -> float:
    """Meter energy between two samples that belongs to an outage: the later one in BACKUP, forward only."""
    if not sample.backup or previous is None or sample.meter_wh is None or previous.meter_wh is None:
        return 0.0
    return max(0.0, sample.meter_wh - previous.meter_wh)


def line_keys(summaries: list[EventSummary]) -> list[str]:
    """Each summary's key in a ledger: its request id, and for a second account under the same id (a
    revision that turned a discharge into a charge) the id and its count."""
    seen: dict[str, int] = {}
    keys = []
    for summary in summaries:
        n = seen[summary.request_id] = seen.get(summary.request_id, -1) + 1
        keys.append(summary.request_id if n == 0 else f"{summary.request_id}\x1f{n}")
    return keys


@dataclass
class Ledger:
    """Folds the run's samples, oldest first, into each event's tally and the period's outage energy."""

    period: Period
    tallies: dict[str, Tally]
    outage_backup_wh: float = 0.0
    gaps: int = 0  # journal gaps in the period
    _previous: Sample | None = field(default=None, repr=False)

    def gap(self, lo: float, hi: float, span: tuple[Position, Position] | None = None) -> None:
        """Core steps from `lo` to `hi` (wall time) were not kept (a `JournalGap`): the next sample follows
        none. The meter change across the hole is nobody's to read: whether the grid was up or down over
        it is not known, so none of it is taken for outage energy (what an event delivered in it is what
        its own energy records billed)."""
        self._previous = None
        if lo < self.period.end and self.period.start <= hi:
            self.gaps += 1
        for tally in self.tallies.values():
            if tally.overlaps(lo, hi, span):
                tally.gaps += 1

    def feed(self, sample: Sample) -> None:
        previous, self._previous = self._previous, sample
        if self.period.holds(sample.wall):
            self.outage_backup_wh += outage_step_wh(sample, previous)
        for tally in self.tallies.values():
            if tally.covers(sample):
                tally.add(sample, previous)


@dataclass(frozen=True)
class EnergyRecords:
    """An event's energy records as billed: the last before the final one (what a restart's gap adds to),
    and its wall time (outage energy after it may be in the gap). All of its last account: an event
    delivered again after a restart closed it is counted afresh from 0 Wh, so the final record's own
    figure, not the event's sum over its accounts, is what the gap is measured against."""

    before_final_wh: float | None = None
    before_final_wall: float | None = None
    final_wh: float | None = None


def window(summary: EventSummary, journal_end: float) -> tuple[float, float]:
    """The event's bounds in wall time: from its start (or its answer) to its end (or the journal's end).

    Its end is its core-clock end (`summary.span`) put on the wall clock with the same offset as its start,
    when both stand in one run: a wall-clock step (NTP) between its request and its `DispatchEnded` must not
    stretch or shrink the window people read (and its avg_w). An end a later run wrote (a restart closed
    it) is on another core clock: that record's own wall time is all there is."""
    lo = summary.start if summary.start is not None else _first_at(summary, journal_end)
    ended = _ended_on_start_clock(summary)
    if ended is not None:
        hi = ended
    elif summary.ended_at is not None:
        hi = summary.ended_at
    elif summary.end is not None and math.isfinite(summary.end):
        hi = min(summary.end, journal_end)
    else:
        hi = journal_end
    return lo, max(lo, hi)


def _ended_on_start_clock(summary: EventSummary) -> float | None:
    """The event's `DispatchEnded`, in wall time by its start's offset, if it ended in the run it started in."""
    if summary.ended_at is None or summary.span is None or summary.offset is None:
        return None
    (start_run, _), (end_run, end_at) = summary.span
    return end_at + summary.offset if end_run == start_run and math.isfinite(end_at) else None


def _first_at(summary: EventSummary, journal_end: float) -> float:
    if summary.received_at is not None:
        return summary.received_at
    return summary.timeline[0].at if summary.timeline else journal_end


def status_of(summary: EventSummary) -> EventStatus:
    if summary.verdict is None:
        return EventStatus.NOT_ANSWERED
    if not summary.ran:
        return EventStatus.REFUSED
    if summary.ended_at is None:
        return EventStatus.OPEN
    if (summary.ended_reason or "").startswith(RESTART_REASON):
        return EventStatus.RESTARTED
    return EventStatus.ENDED


COMMISSIONING_SOURCE = "commission"
"""The source of an installer's test discharge (`powershare-gw commission`): energy that proved the
wiring, not energy the grid asked for, so it is listed and never credited."""


def event_figures(summary: EventSummary, tally: Tally, terms: ProgramTerms, capacity_wh: float,
                  energy: EnergyRecords) -> dict[str, Any]:
    """One event's line of the statement (§3.11 names, plus kind, target, reason, status and credited_wh)."""
    status = status_of(summary)
    served = summary.verdict in SERVED
    discharge = summary.kind == DispatchKind.DISCHARGE.value
    delivered = summary.meter_wh if served else 0.0
    outage = tally.outage_wh if served else 0.0  # the house's energy in the window, whatever the event delivered
    creditable = discharge and summary.source != COMMISSIONING_SOURCE
    in_gap = min(tally.gap_outage_wh, _restart_gap_wh(summary, status, energy))
    credited = max(0.0, delivered - in_gap) if creditable else 0.0
    capacity_wh = tally.capacity_wh or capacity_wh  # the event's own run's, not the last run's
    unstepped = served and not tally.steps  # its SoC not known: readings in its window are another run's
    throughput = tally.drop_pct / 100 * capacity_wh if served and not unstepped else 0.0
    soc = (None, None, None) if unstepped else (tally.soc_start, tally.soc_end, tally.soc_min)
    hours = (tally.hi - tally.lo) / 3600
    rate = terms.credit_per_kwh if summary.price_per_kwh is None else summary.price_per_kwh
    what = f"event {summary.request_id!r}"
    credit = _priced(credited, rate, f"{what}: its credit at {rate!r} per kWh")
    wear = _priced(throughput, terms.wear_cost_per_kwh,
                   f"{what}: its wear cost at {terms.wear_cost_per_kwh!r} per kWh")
    net = _money(Decimal(repr(credit)) - Decimal(repr(wear)), f"{what}: its net")
    return {
        "id": summary.request_id, "source": summary.source, "kind": summary.kind, "target_w": _asked(summary.target_w),
        "window": {"from": iso(tally.lo), "to": iso(tally.hi)},
        "answer": summary.verdict, "cap_w": _asked(summary.cap_w), "reason": summary.reason, "status": status.value,
        "delivered_wh": _wh(delivered), "integrated_wh": _wh(summary.integrated_wh if served else 0.0),
        "avg_w": round(summary.integrated_wh / hours, 1) if served and hours > 0 else 0.0,
        "peak_w": _peak_w(tally) if served else 0.0,
        "soc_start_pct": _pct(soc[0]), "soc_end_pct": _pct(soc[1]),
        "soc_min_pct": _pct(soc[2]), "floor_pct": _pct(tally.floor_pct),
        "throughput_wh": _wh(throughput), "equivalent_cycles": round(throughput / capacity_wh, 6),
        "outage_wh": _wh(outage), "credited_wh": _wh(credited),
        "credit": credit, "wear_cost": wear, "net": net,
        "notes": [*notes(summary, status, served, discharge, outage, energy), *gap_notes(tally.gaps if served else 0),
                  *(UNSTEPPED_NOTES if unstepped else [])],
    }


def _peak_w(tally: Tally) -> float | None:
    """The highest power measured while the event was served; None (not 0 W, which would sit below its avg_w)
    where the journal holds no reading of it: a run killed before it journaled its batch of core steps."""
    return None if tally.peak_w is None else round(max(0.0, tally.peak_w), 1)


def _restart_gap_wh(summary: EventSummary, status: EventStatus, energy: EnergyRecords) -> float:
    """The meter gap a restart billed to the event: the one part of its meter figure read across a time the
    gateway did not see, so the one part that can hold backup energy."""
    if status is not EventStatus.RESTARTED or energy.before_final_wh is None:
        return 0.0
    final = summary.meter_wh if energy.final_wh is None else energy.final_wh
    return max(0.0, final - energy.before_final_wh)


def notes(summary: EventSummary, status: EventStatus, served: bool, discharge: bool, outage_wh: float,
          energy: EnergyRecords) -> list[str]:
    """What a reader must know to trust (or dispute) the line's figures."""
    said: list[str] = []
    if summary.price_per_kwh is not None:
        said.append(f"price-driven: credited at the published {summary.price_kind} of {summary.price_per_kwh:g} "
                    f"per kWh, not the program's credit_per_kwh")
    if status is EventStatus.REFUSED:
        said.append(f"refused {summary.reason or ''}: {summary.detail}".replace(" :", ":").rstrip(": "))
    elif summary.verdict == Verdict.CAPPED.value and summary.cap_w is not None:
        said.append(f"capped to {summary.cap_w:.0f} W" + (f": {summary.detail}" if summary.detail else ""))
    if status is EventStatus.OPEN:
        said.append("still open: figures so far (the journal has no end for this event yet)")
    if status is EventStatus.RESTARTED:
        gap = _restart_gap_wh(summary, status, energy)
        billed = f"the meter gap of {gap:.1f} Wh since its last report billed" if gap else "no meter gap billed"
        said.append(f"closed after a gateway restart ({summary.ended_reason}): {billed}")
    if served and not discharge:
        said.append(f"a {summary.kind} request: energy into the truck earns no credit")
    if served and summary.source == COMMISSIONING_SOURCE:
        said.append("the installer's commissioning test discharge: not a grid event, earns no credit")
    if outage_wh > 0:
        said.append(f"{outage_wh:.1f} Wh flowed during a grid outage (backup): the house's, not the event's, "
                    "never credited")
    if served and summary.discrepancy_pct is None:
        said.append("the meter stood still while power flowed: check the inverter's meter")
    elif served and abs(summary.discrepancy_pct or 0.0) > DISCREPANCY_NOTE_PCT:
        said.append(f"meter and integrated power differ by {summary.discrepancy_pct:.1f} %")
    return said


def gap_notes(gaps: int) -> list[str]:
    """What a reader must know of a window (an event's, or the period) that holds journal gaps."""
    if not gaps:
        return []
    return [f"the journal kept no core steps for part of this window ({gaps} JournalGap record(s): writes failed "
            "for long): energy across a gap is not counted as outage energy; an event's own energy reports "
            "bill it"]


UNSTEPPED_NOTES = (
    "the journal holds no core step of this window (a run killed before it journaled its batch of steps loses "
    "them): peak power, SoC and throughput are not known; its own energy reports bill it",)
"""What a reader must know of a served event whose window holds no core step of its own."""


def totals(lines: Iterable[dict[str, Any]], outage_backup_wh: float) -> dict[str, Any]:
    """The period's sums; outage energy beside them, never credited."""
    lines = list(lines)

    def total(name: str, digits: int) -> float:
        return round(sum((line[name] for line in lines), 0.0), digits)  # 0.0 for none, as every figure is

    return {"events": len(lines), "events_served": sum(1 for line in lines if line["answer"] in SERVED),
            "delivered_wh": total("delivered_wh", ENERGY_DIGITS), "credited_wh": total("credited_wh", ENERGY_DIGITS),
            "throughput_wh": total("throughput_wh", ENERGY_DIGITS),
            "equivalent_cycles": total("equivalent_cycles", 6), "outage_backup_wh": _wh(outage_backup_wh),
            "credit": total("credit", MONEY_DIGITS), "wear_cost": total("wear_cost", MONEY_DIGITS),
            "net": total("net", MONEY_DIGITS)}


def iso(at: float) -> str:
    """Wall seconds as UTC ISO-8601 (a bench's simulated seconds read as 1970-01-01). The year is written
    with four digits by hand: glibc's strftime("%Y") does not pad years 1 to 999, which ISO-8601 (and
    `parse_iso`, reading a statement's period back) requires."""
    when = datetime.fromtimestamp(at, UTC)
    return f"{when.year:04d}" + when.strftime("-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


def _lowest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _priced(wh: float, per_kwh: float, what: str) -> float:
    """The statement's own energy figure (as rounded there) at a price per kWh, in decimal: a reader
    multiplying the printed figures gets the same cent (0.83 kWh at 0.50 is 0.42; binary floats, 0.41).
    A price that is no number (only an edited journal holds one: the core refuses it) prices nothing."""
    if not (is_finite_number(wh) and is_finite_number(per_kwh)):
        return 0.0
    return _money(Decimal(repr(_wh(wh))) / 1000 * Decimal(repr(per_kwh)), what)


def _money(value: float | Decimal, what: str) -> float:
    """To the cent, half up (away from zero), as people round money. An amount too large to hold to the
    cent (a price the core refuses, in a journal of an older release or an edited statement) is bad input
    named by `what`: a statement priced with it would mean nothing."""
    exact = value if isinstance(value, Decimal) else Decimal(repr(value))
    try:
        return float(exact.quantize(CENT, ROUND_HALF_UP)) + 0.0  # + 0.0: never "-0.0"
    except InvalidOperation:
        raise InputError(f"{what}: {exact:.6g} is too large an amount of money to state to the cent") from None


def _wh(value: float) -> float:
    return round(value, ENERGY_DIGITS) + 0.0


def _asked(value: float | None) -> float | None:
    """A power as the request or answer stated it; None for one that is not a number (a request the core
    refused as INVALID for it): a statement is strict JSON, and its `reason` says what was wrong."""
    return value if is_finite_number(value) else None


def _pct(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
