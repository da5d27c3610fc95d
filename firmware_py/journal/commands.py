"""`powershare-gw report`: per-event energy and timeline from a journal, and its chain check.

Exit codes (docs/command-line.md): 0 the chain is intact, 1 it is broken (the report is
still printed, so an operator sees what the damaged journal claims), 2 the file
is missing or not a journal, or `--event` names no event in it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone

from firmware_py.errors import InputError
from firmware_py.journal import codec
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.owner_log import OwnerChange, owner_changes
from firmware_py.journal.store import Journal
from firmware_py.journal.summary import EventSummary, event_summaries
from firmware_py.quoting import printable

CSV_COLUMNS = ("request_id", "source", "kind", "target_w", "revision", "start", "end", "verdict", "cap_w",
               "reason", "ended_at", "ended_reason", "meter_wh", "integrated_wh", "final", "discrepancy_pct")

EPOCH_THRESHOLD_S = 1e8
"""`at` above this is UTC epoch seconds (`run`); below, seconds of simulated time (`sim`)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-event delivered energy and timeline from a journal; verifies its hash chain")
    p.add_argument("--journal", required=True, metavar="FILE", help="the journal SQLite file")
    p.add_argument("--event", metavar="ID", help="only this dispatch event (request id)")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text",
                   help="text (default) for people; json or csv for machines")
    p.set_defaults(handler=report)


def report(args: argparse.Namespace) -> int:
    """Print the report in the chosen format; 1 when the chain is broken."""
    with Journal.open(args.journal, readonly=True) as journal:
        problems = journal.verify()
        count = len(journal)
        try:
            events = event_summaries(journal)
            changes = owner_changes(journal.records(RecordKind.OWNER_SETTINGS) +
                                    journal.records(RecordKind.INSTALLER_RESET))
        except InputError:
            if not problems:
                raise
            events, changes = [], []  # the damage that verify() reported also hides them: say so, exit 1
        changes.sort(key=lambda change: change.seq)
    if args.event is not None:
        events = [e for e in events if e.request_id == args.event]
        if not events:
            raise InputError(f"{args.journal}: --event: no dispatch event with id {args.event!r} in this journal")
    if args.event is not None:
        changes = []  # one event's report: its timeline already holds the changes made while it ran
    {"text": _print_text, "json": _print_json, "csv": _print_csv}[args.format](events, count, problems, changes)
    return 1 if problems else 0


def chain_line(count: int, problems: list[str]) -> str:
    if not problems:
        return f"chain: intact ({count} records)"
    noun = "problem" if len(problems) == 1 else "problems"
    return f"chain: BROKEN ({count} records, {len(problems)} {noun})"


def _print_text(events: list[EventSummary], count: int, problems: list[str], changes: list[OwnerChange]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # never parsed as markup: ids and texts came from aggregators

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160, highlight=False)
    table = Table(title="Dispatch events", title_justify="left")
    for name, justify in (("event", "left"), ("source", "left"), ("kind", "left"), ("target W", "right"),
                          ("answer", "left"), ("start", "right"), ("end", "right"), ("meter Wh", "right"),
                          ("integrated Wh", "right"), ("diff %", "right"), ("final", "left")):
        table.add_column(name, justify=justify)
    for e in events:
        table.add_row(printable(e.request_id), printable(e.source or "-"), printable(e.kind or "-"),
                      _num(e.target_w, 0), printable(_answer(e)),
                      _time(e.start), _time(e.ended_at if e.ended_at is not None else e.end),
                      f"{e.meter_wh:.1f}", f"{e.integrated_wh:.1f}", _num(e.discrepancy_pct, 2),
                      "yes" if e.final else "no")
    console.print(table, markup=False)
    for e in events:
        timeline = Table(title=Text(f"Timeline: {printable(e.request_id)}"), title_justify="left")
        timeline.add_column("at", justify="right")
        timeline.add_column("seq", justify="right")
        timeline.add_column("record")
        timeline.add_column("what")
        for entry in e.timeline:
            timeline.add_row(_time(entry.at), str(entry.seq), entry.kind, printable(entry.text))
        console.print(timeline, markup=False)
    if changes:
        table = Table(title="Owner and installer changes", title_justify="left")
        for name, justify in (("at", "right"), ("seq", "right"), ("what", "left")):
            table.add_column(name, justify=justify)
        for change in changes:
            table.add_row(_time(change.at), str(change.seq), printable(change.text))
        console.print(table, markup=False)
    console.print(chain_line(count, problems), markup=False)
    for problem in problems:
        console.print(f"  - {printable(problem)}", markup=False)


def _print_json(events: list[EventSummary], count: int, problems: list[str], changes: list[OwnerChange]) -> None:
    document = {
        "chain": {"intact": not problems, "records": count, "problems": problems},
        "events": [asdict(e) for e in events],
        "owner_changes": [asdict(c) for c in changes],
    }
    json.dump(codec.jsonable(document), sys.stdout, indent=2)
    sys.stdout.write("\n")


def _print_csv(events: list[EventSummary], count: int, problems: list[str], changes: list[OwnerChange]) -> None:
    """One row per event (the owner's changes are in the text and JSON reports); the chain verdict goes to
    stderr so the CSV stays pure data."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for e in events:
        row = codec.jsonable({name: getattr(e, name) for name in CSV_COLUMNS})
        writer.writerow(_csv_cell(row[name]) for name in CSV_COLUMNS)
    print(chain_line(count, problems), file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def _csv_cell(value: object) -> object:
    """Empty for none, lower-case booleans as in the JSON output."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _answer(e: EventSummary) -> str:
    if e.verdict is None:
        return "-"
    text = e.verdict
    if e.cap_w is not None:
        text += f" {e.cap_w:.0f} W"
    return text + (f" {e.reason}" if e.reason else "")


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _time(at: float | None) -> str:
    if at is None:
        return "-"
    if at == float("inf"):
        return "open"
    if at >= EPOCH_THRESHOLD_S:
        return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{at:.1f} s"
