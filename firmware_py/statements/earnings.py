"""This month's earnings and each event's figures while the gateway runs: a statement, kept at hand.

The owner API's status, the web app (its status and history) and MQTT show what a
statement would say, so they get it from the statement's own code: `month_earnings`
is `make.statement_from_journal` for the calendar month (UTC), unsigned. An owner
comparing the status with the signed statement at the month's end finds the same
figures, because nothing here computes them a second way.

A statement walks the journal's chain (every journaled core step, decoded), which
takes time that grows with the journal, so `EarningsBook` never does it on the
event loop and never on a reader's behalf:
- reading the status costs nothing: it shows the last result (`latest`, with the
  journal record it was computed at);
- the result is made again, in a worker thread and one at a time, only when the
  gateway has journaled what settles an event's account since (its end, its final
  energy or a refusal, and the batch of core steps after them: `journaled`), at most
  every `refresh_s`, and when the month turns. Neither between events nor while the
  truck serves one is the journal read for it: an event's figures follow its end
  (meanwhile the status shows its energy so far, live).
- the history asks for the figures of the day's events; on the first day of a month
  those include last month's, computed once then kept with the month.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from firmware_py.clocks import Clocks
from firmware_py.config import Config
from firmware_py.errors import InputError
from firmware_py.journal.chain import Chain
from firmware_py.journal.store import Journal
from firmware_py.statements.document import Selection, month_of
from firmware_py.statements.figures import Period, ProgramTerms, iso
from firmware_py.statements.make import Basis, statement_from_journal

log = logging.getLogger(__name__)

REFRESH_S = 60.0
"""At most this often (gateway clock) the month is computed again, and only after an event was settled."""
SHOWN_TOTALS = ("events", "events_served", "delivered_wh", "credited_wh", "throughput_wh", "credit", "wear_cost",
                "net")
"""The month's totals the status shows (the statement's own `totals`)."""


def basis_of(config: Config, journal: Path | None = None) -> tuple[Path, Basis]:
    """The journal and what a statement of this gateway is computed from: `[program]` and its name."""
    program = config.program
    terms = ProgramTerms(program.name, program.currency, program.credit_per_kwh, program.wear_cost_per_kwh)
    journal = Path(journal or config.journal.path)
    return journal, Basis(terms, {"name": config.dispatch.openadr.ven_name, "journal": journal.name},
                          fallback_capacity_wh=config.vehicle.usable_capacity_wh)


def month_name(period: Period) -> str:
    return datetime.fromtimestamp(period.start, UTC).strftime("%Y-%m")


@dataclass(frozen=True)
class Earnings:
    """One month's unsigned statement, as computed at a journal record (`statement["journal_seq"]`)."""

    month: str
    statement: dict[str, Any]
    computed_at: float  # wall time

    def summary(self) -> dict[str, Any]:
        """The status's `earnings`: the month's totals, its currency, and when they were computed."""
        totals = self.statement["totals"]
        return {"month": self.month, "currency": self.statement["currency"],
                "program": self.statement["program"]["name"],
                **{name: totals[name] for name in SHOWN_TOTALS},
                "as_of": iso(self.computed_at), "journal_seq": self.statement["journal_seq"]}

    def figures(self) -> dict[str, dict[str, Any]]:
        """Each event's line of the statement, by event id."""
        return {line["id"]: line for line in self.statement["events"]}


def month_earnings(journal: Path, basis: Basis, period: Period, wall_now: float) -> Earnings:
    """The month `period` as a statement made now would show it (up to the live segment's newest record).

    InputError when the journal cannot be read; the chain is not checked here (the signed
    statement does that), only read.
    """
    chain = Chain(journal)
    with Journal.open(journal, readonly=True) as live:
        head_seq, head_hash = live.last_seq, live.head_hash
    statement = statement_from_journal(chain, Selection(period=period), basis, head_seq, head_hash)
    return Earnings(month_name(period), statement, wall_now)


class EarningsBook:
    """The gateway's earnings, kept up to date off the event loop (see the module docstring)."""

    def __init__(self, journal: Path, basis: Basis, clocks: Clocks, *, refresh_s: float = REFRESH_S,
                 compute: Callable[[Path, Basis, Period, float], Earnings] = month_earnings) -> None:
        self.journal, self.basis, self.clocks = journal, basis, clocks
        self.refresh_s = refresh_s
        self._compute = compute
        self._months: dict[str, Earnings] = {}
        self._current: str | None = None
        self._written = 0  # records that settle an event, journaled so far
        self._computed_written = -1  # ... when the current month was last computed
        self._computed_mono = -float("inf")
        self._steps_owed = False  # such records were written, and no batch of steps since
        self._lock = asyncio.Lock()
        self._failing = False
        self.updated = asyncio.Event()
        """Set once a month has been computed (for whoever waits for the first figures)."""

    def journaled(self, records: int, *, steps: bool = False) -> None:
        """The gateway wrote `records` that settle an event's account (an end, final energy, a refusal) to
        the journal, and with `steps` a batch of core steps. The first batch after such records counts too:
        the SoC and power an event's figures take from the steps reach the journal up to a batch later."""
        if records:
            self._written += records
            self._steps_owed = True
        elif steps and self._steps_owed:
            self._written += 1
            self._steps_owed = False

    def latest(self) -> dict[str, Any] | None:
        """This month's earnings as last computed (None before the first computation)."""
        earnings = self._months.get(self._current or "")
        return earnings.summary() if earnings is not None else None

    def figures(self, since_wall: float) -> tuple[str, dict[str, dict[str, Any]]]:
        """(currency, each event's statement line by id) for the months from `since_wall` to now, as computed."""
        found: dict[str, dict[str, Any]] = {}
        for name in self._months_from(since_wall):
            if name in self._months:
                found |= self._months[name].figures()
        return self.basis.terms.currency, found

    def due(self) -> bool:
        """Whether the current month must be computed (again) now."""
        wall = self.clocks.wall()
        if month_name(month_of(wall)) not in self._months:
            return True
        fresh = self._written == self._computed_written
        return not fresh and self.clocks.monotonic() - self._computed_mono >= self.refresh_s

    async def refresh(self, since_wall: float | None = None) -> None:
        """Compute the current month when `due`, and each earlier month from `since_wall` not yet computed.

        In a worker thread, one computation at a time; a journal that cannot be read is
        logged once and leaves the last result in place.
        """
        async with self._lock:
            wall = self.clocks.wall()
            current = month_of(wall)
            if self._current is not None and self._current != month_name(current):
                del self._months[self._current]  # the month turned: the last one is computed whole once more
                self._current = None
            wanted = [m for m in self._periods_from(wall if since_wall is None else since_wall)
                      if month_name(m) != month_name(current) and month_name(m) not in self._months]
            if self.due():
                wanted.append(current)
            for period in wanted:
                await self._compute_month(period, wall, current=period == current)

    async def _compute_month(self, period: Period, wall: float, *, current: bool) -> None:
        written, started = self._written, self.clocks.monotonic()
        try:
            earnings = await asyncio.to_thread(self._compute, self.journal, self.basis, period, wall)
        except (InputError, OSError, sqlite3.Error) as err:
            if not self._failing:
                log.warning("earnings: the journal cannot be read for %s (%s); the status shows the last figures",
                            month_name(period), err)
            self._failing = True
            if current:
                self._computed_written, self._computed_mono = written, started  # retried after refresh_s
            return
        self._failing = False
        self._months[earnings.month] = earnings
        self.updated.set()
        if current:
            self._current = earnings.month
            self._computed_written, self._computed_mono = written, started
            self._forget_before(period)

    def _forget_before(self, period: Period) -> None:
        """Keep the current month and the one before it (the history's day may reach into it)."""
        previous = month_name(month_of(period.start - 1))
        for name in [n for n in self._months if n not in (month_name(period), previous)]:
            del self._months[name]

    def _months_from(self, since_wall: float) -> list[str]:
        return [month_name(p) for p in self._periods_from(since_wall)]

    def _periods_from(self, since_wall: float) -> list[Period]:
        """The months from the one holding `since_wall` to the current one, oldest first (at most two)."""
        periods = [month_of(self.clocks.wall())]
        if since_wall < periods[0].start:
            periods.insert(0, month_of(periods[0].start - 1))
        return periods
