"""What a statement needs from a journal, read once, up to a given head record.

The thin I/O side of statements: it streams the chain (every segment, a page at a
time) and hands plain facts to the pure figures (`figures`, `document`). Reading
stops at `head_seq`, so a statement verified later, against a journal that has
grown since, is recomputed from exactly the records it was made from.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from firmware_py.core import types as core
from firmware_py.core.floor import floor_pct
from firmware_py.core.policy import Policy
from firmware_py.errors import InputError
from firmware_py.journal.chain import Chain
from firmware_py.journal.codec import number
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.steps import decode_batch, decode_start
from firmware_py.journal.store import GENESIS_HASH, Record
from firmware_py.journal.summary import EventSummary, Position, event_summaries
from firmware_py.statements.figures import EnergyRecords, Ledger, Period, Sample, Tally, line_keys, window


class HeadBound:
    """A chain's records up to and including `head_seq` (a `summary.RecordSource`)."""

    def __init__(self, chain: Chain, head_seq: int):
        self.chain, self.head_seq = chain, head_seq
        self._newest: tuple[float, float] | None = None

    def iter_records(self, kinds: Collection[RecordKind | str] | None = None) -> Iterator[Record]:
        for record in self.chain.iter_records(kinds):
            if record.seq > self.head_seq:
                return
            yield record

    def newest(self) -> tuple[float, float]:
        """(core time, wall time) of the newest record up to the head; (0, 0) for none."""
        if self._newest is None:
            self._newest = (0.0, 0.0)
            for record in self.iter_records():
                self._newest = (record.at, record.wall)
        return self._newest

    def head_hash(self) -> str | None:
        """The hash of record `head_seq`; an empty journal's (no record 0: its chain starts from the
        genesis hash, which a statement made from it names)."""
        if self.head_seq == 0:
            return GENESIS_HASH
        for record in self.iter_records():
            if record.seq == self.head_seq:
                return record.hash
        return None


@dataclass
class JournalFacts:
    """Everything the figures are computed from."""

    summaries: list[EventSummary]
    ledger: Ledger
    energy: dict[str, EnergyRecords]
    capacity_wh: float | None
    journal_end: float  # wall time of the newest record read
    first_wall: float | None = None
    problems: list[str] = field(default_factory=list)


def select_summaries(source: HeadBound, only: str | None) -> list[EventSummary]:
    try:
        return event_summaries(source, only=only)
    except InputError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{source.chain.live}: a dispatch record cannot be read: {err}") from None


def read_facts(source: HeadBound, period: Period, summaries: list[EventSummary]) -> JournalFacts:
    """The samples folded into each event's tally, the outage energy and the energy records."""
    journal_end = source.newest()[1]
    lines = dict(zip(line_keys(summaries), summaries, strict=True))
    energy = _energy_records(lines)
    tallies = {key: Tally(*window(s, journal_end), request_id=s.request_id,
                          gap_from=energy.get(key, EnergyRecords()).before_final_wall, span=s.span)
               for key, s in lines.items()}
    ledger = Ledger(period, tallies)
    backup = _backup_spans(source)
    capacity = _fold_steps(source, ledger, backup)
    return JournalFacts(summaries, ledger, energy, capacity, journal_end)


def _backup_spans(source: HeadBound) -> list[tuple[float, float]]:
    """When the gateway was in BACKUP (a grid outage), on the wall clock: the core's own clock starts
    again with every run. A span a run left open (it died in an outage) ends where the next run
    starts, whose core begins in STARTUP, never in BACKUP."""
    spans: list[tuple[float, float]] = []
    since: float | None = None
    for record in source.iter_records({RecordKind.TRANSITION, RecordKind.CORE_START}):
        if record.kind == RecordKind.CORE_START:
            if since is not None:
                spans.append((since, record.wall))
                since = None
            continue
        to_state, from_state = record.payload.get("to_state"), record.payload.get("from_state")
        if to_state == core.Mode.BACKUP.value and since is None:
            since = record.wall
        elif from_state == core.Mode.BACKUP.value and since is not None:
            spans.append((since, record.wall))
            since = None
    if since is not None:
        spans.append((since, math.inf))
    return spans


def _energy_records(lines: dict[str, EventSummary]) -> dict[str, EnergyRecords]:
    """Per line (`line_keys` → its summary), the meter energy its last report before the final one billed,
    and when (wall time), with the final figure: all within its last account (a final record closes an account; one the
    event is delivered again after starts from 0 Wh, and must not measure against the old one's reports).

    Each line's records are the energy entries of its own summary's timeline (in journal order), the records
    the summary was built from: an id's second line (a revision that turned a discharge into a charge) has
    records of its own, and the discharge's restart gap was measured against the charge's final record
    (negative: "no meter gap billed" of a gap that was). Read from the timeline, not looked up again in the
    journal by seq: a record a rotation carried for an event whose archive was pruned stands at its
    segment start's seq, which no `EventEnergy` record has (its last report was lost and its restart gap,
    outage energy included, credited), and events carried together share that seq."""
    found: dict[str, EnergyRecords] = {}
    for key, summary in lines.items():
        last: tuple[float, float] | None = None
        for entry in summary.timeline:
            if entry.kind != RecordKind.EVENT_ENERGY:
                continue
            if entry.final:
                found[key] = EnergyRecords(*(last or (None, None)), final_wh=entry.meter_wh)
                last = None
            elif entry.meter_wh is not None:
                last = (entry.meter_wh, entry.at)
    return found


class ServedRequests:
    """Which request the core served at a step, from its `ServingChanged` records, run by run.

    A batch of steps is journaled after the changes it holds, so the changes are read first; each run's
    core time is its own, so they are kept per run (counted by `CoreStart` records). A run that journaled
    none served nothing, or ran an older release that did not journal them: it counts as journaling them
    (`journaled`) when it or an earlier run journaled any (a release that journals them keeps doing so);
    otherwise its time served by none is charged as before (`Tally.lent`)."""

    def __init__(self, source: HeadBound):
        self._runs: list[list[tuple[float, str | None]]] = [[]]
        for record in source.iter_records({RecordKind.CORE_START, RecordKind.SERVING_CHANGED,
                                           RecordKind.SEGMENT_START}):
            if record.kind == RecordKind.CORE_START:
                self._runs.append([])
            elif record.kind == RecordKind.SEGMENT_START:
                if len(self._runs) == 1 and "serving" in (run := _noted_run(record)):
                    # the run's start and its changes so far were pruned: served then, as the rotation said
                    self._runs[0].append((record.at, None if run["serving"] is None else str(run["serving"])))
            else:
                served = record.payload.get("request_id")
                self._runs[-1].append((record.at, None if served is None else str(served)))
        self._journaled = [any(self._runs[: n + 1]) for n in range(len(self._runs))]
        self._changes: list[tuple[float, str | None]] = self._runs[0]
        self._next, self._serving = 0, None
        self.journaled = self._journaled[0]

    def start_run(self, run: int) -> None:
        self._changes = self._runs[run] if run < len(self._runs) else []
        self._next, self._serving = 0, None
        self.journaled = self._journaled[min(run, len(self._journaled) - 1)]

    def at(self, now: float) -> str | None:
        """The request served after the step at `now` (steps come in time order within a run)."""
        while self._next < len(self._changes) and self._changes[self._next][0] <= now:
            self._serving = self._changes[self._next][1]
            self._next += 1
        return self._serving


def _fold_steps(source: HeadBound, ledger: Ledger, backup: list[tuple[float, float]]) -> float | None:
    """Feed every journaled core step, as a sample, to the ledger; the usable capacity the core ran with."""
    policy: Policy | None = None
    owner: core.OwnerSettings | None = None
    bms: core.BmsSnapshot | None = None
    inverter: core.InverterStatus | None = None
    served, run = ServedRequests(source), 0
    kinds = {RecordKind.CORE_START, RecordKind.CORE_STEPS, RecordKind.JOURNAL_GAP, RecordKind.SEGMENT_START}
    for record in source.iter_records(kinds):
        if record.kind == RecordKind.JOURNAL_GAP:
            _gap(record, ledger, run)
            continue
        if record.kind == RecordKind.SEGMENT_START:
            if policy is None and "start" in (run_state := _noted_run(record)):
                # the run's `CoreStart` was pruned: its policy and owner settings as the rotation noted them
                policy, owner, _ = _start(record, run_state["start"])
            continue
        if record.kind == RecordKind.CORE_START:
            policy, owner, _ = _start(record, record.payload)
            run += 1
            served.start_run(run)
            continue
        try:
            steps = decode_batch(record.payload)
        except (ValueError, TypeError) as err:
            raise InputError(f"record {record.seq}: {err}") from None
        offset = record.offset
        for now, inputs in steps:
            seen = measured = False
            for item in inputs:
                if isinstance(item, core.BmsSnapshot):
                    bms, seen = item, True
                elif isinstance(item, core.InverterStatus):
                    inverter, seen, measured = item, True, True
                elif isinstance(item, core.OwnerSettings):
                    owner = item
            if seen:
                ledger.feed(_sample((run, now), offset, bms, inverter, policy, owner, backup, measured,
                                    served.at(now), served.journaled))
    return None if policy is None else policy.usable_capacity_wh


def _noted_run(start: Record) -> dict[str, Any]:
    """The run in progress a rotation noted in a segment's start (`run`: its CoreStart, the request served);
    {} when it noted none (an older release's, or no run)."""
    run = start.payload.get("run")
    return run if isinstance(run, dict) else {}


def _start(record: Record, payload: Any) -> tuple[Policy, core.OwnerSettings, float]:
    """A core start's policy, owner settings and time; InputError naming the record when it cannot be read."""
    try:
        return decode_start(payload)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputError(f"record {record.seq}: a core start that cannot be read: {err}") from None


def _gap(record: Record, ledger: Ledger, run: int) -> None:
    """A `JournalGap` that dropped core steps: the ledger reads no meter change across it. Its bounds are on
    the core's clock of `run` (which events' windows it touches), placed on the wall clock as its record
    was for the period (an unreadable bound: the record's own time)."""
    if not record.payload.get("steps"):
        return  # only history samples were dropped: every core step is here
    offset = record.offset
    lo, hi = number(record.payload.get("from")), number(record.payload.get("to"))
    lo, hi = record.at if lo is None else lo, record.at if hi is None else hi
    ledger.gap(lo + offset, hi + offset, ((run, lo), (run, hi)))


def _sample(position: Position, offset: float, bms: core.BmsSnapshot | None, inverter: core.InverterStatus | None,
            policy: Policy | None, owner: core.OwnerSettings | None, backup: list[tuple[float, float]],
            measured: bool, serving: str | None, servings_journaled: bool) -> Sample:
    """The step's sample; its power only from a reading taken at this step (`measured`): an older one
    belongs to the time it was read, which may have been another request's. `position` (run, core time)
    places it in event windows; `offset` (its batch's wall - core) only in the period and outage spans."""
    _, now = position
    usable = inverter is not None and inverter.comms_ok
    outage = usable and inverter is not None and inverter.grid_outage
    wall = now + offset
    return Sample(
        wall=wall,
        soc_pct=bms.soc_min_pct if bms is not None else None,
        power_w=inverter.measured_w if measured and usable and inverter is not None else None,
        meter_wh=inverter.tot_wh_inj if usable and inverter is not None else None,
        floor_pct=None if policy is None or owner is None else round(floor_pct(policy, owner, now, outage), 3),
        backup=any(lo <= wall <= hi for lo, hi in backup),
        capacity_wh=None if policy is None else policy.usable_capacity_wh,
        serving=serving,
        servings_journaled=servings_journaled,
        position=position,
    )
