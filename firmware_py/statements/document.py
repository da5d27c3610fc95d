"""A statement as one JSON document (docs/command-line.md, statement), composed from facts: no I/O.

Also what the period means: an event belongs to the period its window starts
in; `--event` makes the event's own window the period; no selection means the
calendar month (UTC) of the journal's newest record.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from firmware_py.errors import InputError
from firmware_py.journal.summary import EventSummary
from firmware_py.statements.figures import (
    EnergyRecords,
    Ledger,
    Period,
    ProgramTerms,
    event_figures,
    gap_notes,
    iso,
    line_keys,
    totals,
)

FORMAT_VERSION = 1
_WEEK_ALONE = re.compile(r"\d{4}-?W\d{2}")


@dataclass(frozen=True)
class Selection:
    """Which events a statement covers: one event (by id), or a period."""

    event: str | None = None
    period: Period | None = None


def month_period(text: str) -> Period:
    """YYYY-MM as [first of the month, first of the next), UTC. Exactly that: strptime alone also takes
    `2025-7` and ` 2025-07`, which a statement would then name as a month no one wrote."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}", text):
            raise ValueError(text)
        first = datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise InputError(f"--month: {text!r} is not YYYY-MM") from None
    days = calendar.monthrange(first.year, first.month)[1]
    try:
        return Period(first.timestamp(), (first + timedelta(days=days)).timestamp())
    except OverflowError:  # December 9999: its end is past the last date there is
        raise InputError(f"--month: {text!r} is past the last month a statement can cover") from None


def month_of(at: float) -> Period:
    when = datetime.fromtimestamp(at, UTC)
    return month_period(f"{when.year:04d}-{when.month:02d}")


def range_period(start: str, end: str) -> Period:
    """--from/--to: a date (YYYY-MM-DD, whole days, --to included) or an ISO-8601 instant (UTC if no zone)."""
    lo, hi = _instant(start, "--from", end_of_day=False), _instant(end, "--to", end_of_day=True)
    if hi <= lo:
        raise InputError(f"--to: {end!r} is not after --from {start!r}")
    return Period(lo, hi)


def _instant(text: str, option: str, end_of_day: bool) -> float:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        day = None
    try:
        if day is not None:  # any way of writing a date alone (2025-01-31, 20250131, 2025-W05-5): whole days
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            at = (start + timedelta(days=_days_named(text) if end_of_day else 0)).timestamp()
        else:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
            at = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    except ValueError:
        raise InputError(f"{option}: {text!r} is neither a date (YYYY-MM-DD) nor an ISO-8601 time") from None
    except OverflowError:  # the last day there is, taken whole
        raise InputError(f"{option}: {text!r} is past the last time a statement can cover") from None
    return _in_calendar(at, text, option)


def _days_named(text: str) -> int:
    """A week written alone (2025-W05, 2025W05) names seven days, as `--month` names its month's: Python
    reads it as its Monday, and `--to 2025-W05` covered that Monday alone."""
    return 7 if _WEEK_ALONE.fullmatch(text) else 1


def _in_calendar(at: float, text: Any, name: str) -> float:
    """`at`, if it is a time a statement can print (`iso`): a time zone can move a time written within
    the years 1 to 9999 out of them in UTC."""
    try:
        datetime.fromtimestamp(at, UTC)
    except (ValueError, OverflowError, OSError):
        raise InputError(f"{name}: {text!r} is outside the years 1 to 9999 in UTC, which a statement "
                         "covers") from None
    return at


def parse_iso(text: Any, name: str) -> float:
    """A time this module wrote with `iso`, back to wall seconds; one outside the calendar `iso` prints is
    bad input named by `name`, as on the command line."""
    try:
        at = datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise InputError(f"{name}: {text!r} is not an ISO-8601 time") from None
    return _in_calendar(at, text, name)


def as_printed(period: Period) -> Period:
    """`period` as a statement prints it (`iso`: to the microsecond) and `statement verify` reads it back: the
    one period both compute with, so a sample at an exact bound (an event's end) counts alike in each."""
    return Period(parse_iso(iso(period.start), "period.from"), parse_iso(iso(period.end), "period.to"))


def compose(summaries: list[EventSummary], ledger: Ledger, energy: dict[str, EnergyRecords],
            terms: ProgramTerms, capacity_wh: float, selection: Selection, gateway: dict[str, Any],
            journal_head: str, journal_seq: int, software_version: str) -> dict[str, Any]:
    """The unsigned statement: each event's line, the period's totals, outage energy apart."""
    lines = []
    for key, summary in zip(line_keys(summaries), summaries, strict=True):
        tally = ledger.tallies[key]
        if selection.event is None and not ledger.period.holds(tally.lo):
            continue
        lines.append(event_figures(summary, tally, terms, capacity_wh,
                                   energy.get(key, EnergyRecords())))
    statement = {
        "format": FORMAT_VERSION,
        "gateway": {**gateway, "usable_capacity_wh": capacity_wh},
        "program": terms.as_dict(),
        "period": {"from": iso(ledger.period.start), "to": iso(ledger.period.end), "event": selection.event},
        "events": lines,
        "outage_backup_wh": round(ledger.outage_backup_wh, 3) + 0.0,
        "totals": totals(lines, ledger.outage_backup_wh),
        "currency": terms.currency,
        "journal_head": journal_head,
        "journal_seq": journal_seq,
        "software_version": software_version,
    }
    said = gap_notes(ledger.gaps)
    return {**statement, "notes": said} if said else statement  # only then: earlier statements still verify
